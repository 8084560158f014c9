"""Goodput under failure: a seeded chaos schedule against checkpointless and checkpoint-restart.

    .venv/bin/python scripts/bench/goodput.py [--duration 600] [--mtbf 60] [--seed 0 1 2]
    .venv/bin/python scripts/bench/goodput.py --duration 20 --mtbf 8 --references ends \\
        --step-s 0.7                                                            # quick

One seeded schedule of failures per seed (exponential inter-arrival times with mean
``--mtbf`` seconds; each failure kills one rank process with SIGKILL, or with probability
``--node-fraction`` a whole node: its agent and every process of it) is played against:

* **checkpointless**: 2 ``ncl-launch`` agents x 2 ranks on this machine (``--nnodes 2
  --node-rank 0/1 --peers``, ``--spares 1`` each), ``checkpointless=tier4`` (durable
  checkpoints at ncl-launch's default interval, as a user gets them). A rank kill
  SIGKILLs the process that holds the rank now (``rank_process`` events in the job's
  ``events.jsonl``); a node kill SIGKILLs the agent's process group. A warm standby node
  (``ncl-launch --standby``, started with the job) takes the lost node over by itself,
  and a new standby is started 10 s later, as a scheduler would bring a new spare node
  (``--no-standby``: a replacement agent for the same ``--node-rank`` is started at once
  instead, and its ranks start cold).
* **checkpoint-restart**: ``torchrun --max-restarts 1000`` of the same 4 ranks with
  ``checkpointless=off restart.enabled=true restart.checkpoint_interval=K`` (see
  ``scripts/bench/recovery.py``). A node kill is SIGKILL of both ranks of that node.

Time is counted from the start of the first step (the driver polls ``metrics.jsonl``; the
job's start-up before its first step is the same with or without failures and is left
out). A failure that falls due while the job has not completed a step since the previous
failure waits until it has (failures hit a running job, not a recovering one).

Figures, the headline first:

* ``in_run`` (headline): 1 - (what the failures cost) / wall time, all measured inside
  the chaos run (``nemo_checkpointless/metrics/goodput.py``: each failure is charged the
  time the job took to get past it beyond what the same steps cost at the rate the same
  run kept just before it). The machine's drift between runs cannot push it past 1. It
  leaves out what the job pays without failures (the tier's steady overhead, checkpoint
  writes): ``scripts/bench/overhead.py`` measures that.
* ``end_to_end``: (a fault-free run's time for the same ``max_steps``) / (the chaos run's
  wall time), against each neighbouring fault-free reference: references (torchrun,
  ``checkpointless=off``) run before every chaos run and after the last one
  (``--references interleaved``; ``ends``: only before the first and after the last), and
  both neighbours' figures and their drift are printed. This counts everything lost,
  steady overhead included, but a drifting machine moves it (a 10-minute run once read
  1.031 when its two references differed by 10.9%).
* with several ``--seed`` values: the median and the spread (min..max) over seeds.
* ``lost_steps``: committed steps whose result was thrown away (checkpoint-restart: the
  steps after the checkpoint, dropped from metrics.jsonl at each resume; checkpointless:
  none, by the commit protocol; a step in flight at a failure is redone by both and counts
  as lost time only).

A mode that was not asked for, or that failed, is shown as such, never as 0.
``max_steps`` = duration / step time, measured first with a short fault-free run. Every
chaos run and every later reference is compared with the first reference (``state_sha256``
and every ``loss_hex``). Plot: steps completed over time for the chaos runs of the first
seed and the first reference, with the failures marked (``--plot``, default
``docs/img/goodput.png``). Last line: JSON.

Default recipe: ``tiny_gpt_2opt`` (4 ranks, DP=4, 2 optimizer instances, the replicas
tier 4 needs); ``--recipe bench_gpt`` (27.8 M parameters, 4x the state) works the same,
5x slower per step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _goodput_report as report  # noqa: E402
from _chaos import (CheckpointlessJob, FaultFreeJob, RestartJob, RunFailed, drive,  # noqa: E402
                    make_schedule)
from recovery import REPO, compare, read_jsonl, torchrun_cmd  # noqa: E402
from nemo_checkpointless.metrics.goodput import Trace, failure_costs, in_run_goodput  # noqa: E402

MODES = ("checkpointless", "checkpoint-restart")


def restart_lost_steps(run_dir: Path) -> int:
    """Committed steps dropped at the resumes (rows after the checkpoint step)."""
    path = run_dir / "restart_events.jsonl"
    if not path.exists():
        return 0
    return sum(e.get("dropped_rows", 0) for e in read_jsonl(path)
               if e["event"] == "data_skipped" and e["attempt"] > 0)


def calibrate(base: list[str], work: Path, steps: int, timeout: float) -> float:
    """Mean wall time per step of a short fault-free torchrun run (rows' cadence)."""
    run_dir = work / "calibrate"
    job = FaultFreeJob(torchrun_cmd([*base, f"trainer.max_steps={steps}"], run_dir), run_dir)
    trace = drive(job, run_dir, steps, [], timeout, "calibrate")
    pts = [p for p in trace.points if p[1] >= 2]
    if len(pts) >= 2:
        return (pts[-1][0] - pts[0][0]) / (pts[-1][1] - pts[0][1])
    return trace.t_end / steps


def plot(traces: dict[str, Trace], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    colors = {"fault-free": "0.6", "checkpointless": "tab:green", "checkpoint-restart": "tab:red"}
    for label, trace in traces.items():
        if not trace.points:
            continue
        xs = [0.0] + [p[0] for p in trace.points]
        ys = [0] + [p[1] for p in trace.points]
        ax.step(xs, ys, where="post", color=colors.get(label), label=label, lw=1.4)
        for f in trace.failures:
            ax.axvline(f.fired_at, color=colors.get(label), lw=0.6,
                       ls="--" if f.kind == "node" else ":", alpha=0.7)
    ax.set_xlabel("seconds since the first step started (dotted: a rank killed, dashed: a node)")
    ax.set_ylabel("last committed step")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0,
                        help="seconds of training the chaos run should last at least")
    parser.add_argument("--mtbf", type=float, default=60.0, help="mean time between failures, s")
    parser.add_argument("--seed", type=int, nargs="+", default=[0],
                        help="one chaos run per mode and seed; several: the spread is printed")
    parser.add_argument("--recipe", default="tiny_gpt_2opt")
    parser.add_argument("--node-fraction", type=float, default=0.25,
                        help="probability that a failure kills a whole node (agent + ranks)")
    parser.add_argument("--interval", type=int, default=10,
                        help="checkpoint-restart: checkpoint every K steps")
    parser.add_argument("--spares", type=int, default=1, help="warm spares per agent")
    parser.add_argument("--fallback", choices=("none", "disk"), default="none",
                        help="checkpointless.fallback: disk survives losing both replicas "
                             "of a shard at once (tier 4 alone stops the job, exit 3)")
    parser.add_argument("--hang-timeout", type=float, default=30.0,
                        help="checkpointless: ncl-launch --hang-timeout (a loaded 2-core "
                             "machine stalls ranks for seconds; a silent rank is not hung)")
    parser.add_argument("--no-standby", action="store_true",
                        help="checkpointless: replace a lost node by a new agent for its node "
                             "rank (cold start) instead of a warm standby node")
    parser.add_argument("--references", choices=("interleaved", "ends"), default="interleaved",
                        help="fault-free references before every chaos run and after the "
                             "last (interleaved), or only before the first and after the last")
    parser.add_argument("--step-s", type=float, default=None,
                        help="step time to size max_steps (default: measured first)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "goodput.png")
    args = parser.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    return args


def chaos_run(mode: str, args: argparse.Namespace, overrides: list[str], run_dir: Path,
              max_steps: int, seed: int, timeout: float) -> tuple[Trace, dict]:
    """One chaos run of ``mode`` with ``seed``'s schedule; its trace and accounting."""
    schedule = make_schedule(seed, args.mtbf, horizon=20 * args.duration,
                             node_fraction=args.node_fraction)
    if mode == "checkpointless":
        job = CheckpointlessJob(overrides, run_dir, args.spares, args.fallback,
                                standby=not args.no_standby, hang_timeout=args.hang_timeout)
    else:
        job = RestartJob(overrides, run_dir, args.interval)
    trace = drive(job, run_dir, max_steps, schedule, timeout, f"{mode} seed {seed}")
    lost = restart_lost_steps(run_dir) if mode == "checkpoint-restart" else trace.lost_steps
    costs = failure_costs(trace)
    return trace, {
        "seed": seed, "in_run": in_run_goodput(trace, costs), "failure_costs_s": costs,
        "wall_s": round(trace.t_end, 1), "lost_steps": lost, "failures": len(trace.failures),
        "node_failures": sum(f.kind == "node" for f in trace.failures),
        "fired": [{"t": round(f.fired_at or 0, 1), "kind": f.kind, "target": f.target,
                   "step": f.last_step} for f in trace.failures]}


def main() -> None:
    args = parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ncl-bench-goodput-"))
    work.mkdir(parents=True, exist_ok=True)
    base = [f"recipe={args.recipe}"]
    timeout = 600 + 10 * args.duration  # generous, never hit when healthy

    step_s = args.step_s or calibrate(base, work, 12, 600 + 10 * 60)
    max_steps = max(10, math.ceil(args.duration / step_s))
    overrides = [*base, f"trainer.max_steps={max_steps}"]
    order = report.run_order(args.modes, args.seed, args.references == "interleaved")
    print(f"recipe={args.recipe}: step {step_s:.3f} s -> max_steps={max_steps}; mtbf "
          f"{args.mtbf:.0f} s, seeds {args.seed}; modes {args.modes}; {len(order)} runs "
          f"({sum(s.reference for s in order)} fault-free references); runs in {work}",
          flush=True)

    ref_s: dict[int, float] = {}
    ref_exact: dict[int, bool] = {}
    traces: dict[str, Trace] = {}
    chaos: dict[int, dict] = {}
    results = {m: report.ModeResult(m, m in args.modes) for m in MODES}
    first_ref = work / "reference-0"
    for slot in order:
        if slot.reference:
            run_dir = work / f"reference-{slot.index}"
            job = FaultFreeJob(torchrun_cmd(overrides, run_dir), run_dir)
            trace = drive(job, run_dir, max_steps, [], timeout, f"fault-free #{slot.index}")
            ref_s[slot.index] = trace.t_end
            if slot.index == 0:
                traces["fault-free"] = trace
            else:
                ref_exact[slot.index] = compare(run_dir, first_ref)["exact"]
            print(f"  fault-free #{slot.index}: {trace.t_end:.1f} s for {max_steps} steps",
                  flush=True)
            continue
        run_dir = work / f"{slot.mode}-seed{slot.seed}"
        try:
            trace, res = chaos_run(slot.mode, args, overrides, run_dir, max_steps, slot.seed,
                                   timeout)
        except RunFailed as err:  # report it and go on with the other runs
            print(f"  {slot.mode} seed {slot.seed}: FAILED: {err}", flush=True)
            results[slot.mode].errors.append(f"seed {slot.seed}: {err}")
            continue
        res["exactness"] = compare(run_dir, first_ref)
        res["exact"] = res["exactness"]["exact"]
        chaos[slot.index] = res
        results[slot.mode].runs.append(res)
        if slot.seed == args.seed[0]:
            traces[slot.mode] = trace
        costs = ", ".join("?" if c is None else f"{c:.2f}" for c in res["failure_costs_s"])
        print(f"  {slot.mode} seed {slot.seed}: {trace.t_end:.1f} s, {res['failures']} failures, "
              f"{res['lost_steps']} committed steps lost, in-run {res['in_run']:.3f} "
              f"({'failures cost ' + costs + ' s' if costs else 'no failure fired'}), "
              f"exact {res['exact']}", flush=True)

    for slot in order:  # end to end, once every reference is in
        if slot.index in chaos:
            before, after = report.neighbours(order, slot)
            chaos[slot.index]["end_to_end"] = report.end_to_end(
                chaos[slot.index]["wall_s"], ref_s.get(before.index) if before else None,
                ref_s.get(after.index) if after else None)
    refs = [ref_s[i] for i in sorted(ref_s)]
    drifts = [b / a - 1 for a, b in zip(refs, refs[1:])]
    print("fault-free references: " + ", ".join(f"{t:.1f}" for t in refs) + " s"
          + (f" (largest drift between neighbours {100 * max(drifts, key=abs):+.1f}%)"
             if drifts else ""), flush=True)
    for line in report.headline_lines(results):
        print(line)
    plot(traces, args.plot,
         f"{args.recipe}, 4 CPU ranks, mtbf {args.mtbf:.0f} s (seed {args.seed[0]}), "
         f"{max_steps} steps; goodput in-run: {report.title_figures(results)} "
         f"(restart K={args.interval})")
    ours, restart = results["checkpointless"], results["checkpoint-restart"]
    print(json.dumps({
        "headline": "in_run",
        "goodput_in_run": report.value(ours),
        "restart_goodput_in_run": report.value(restart),
        "modes": {m: {"status": r.status, "in_run": r.in_run(),
                      "costs_measured": dict(zip(("measured", "failures"), r.costs_measured())),
                      "end_to_end_vs_before": r.e2e("vs_before"),
                      "end_to_end_vs_after": r.e2e("vs_after"),
                      "end_to_end_vs_mean": r.e2e(), "runs": r.runs, "errors": r.errors}
                  for m, r in results.items()},
        "fault_free_runs_s": [round(t, 1) for t in refs],
        "references_exact": ref_exact,
        "order": [("reference" if s.reference else f"{s.mode} seed {s.seed}") for s in order],
        "max_steps": max_steps, "step_s": round(step_s, 3), "mtbf_s": args.mtbf,
        "seeds": args.seed, "duration_s": args.duration, "recipe": args.recipe,
        "K": args.interval, "spares": args.spares, "fallback": args.fallback,
        "node_fraction": args.node_fraction, "references": args.references,
        "plot": str(args.plot)}))


if __name__ == "__main__":
    main()
