"""Recovery, side by side: checkpointless (ncl-launch, tier 4) vs stock checkpoint-restart.

    .venv/bin/python scripts/bench/recovery.py [--recipe bench_gpt] [--interval 10] [--kill-step 15]
    .venv/bin/python scripts/bench/recovery.py --recipe tiny_gpt_2opt --interval 3 --kill-step 5  # quick

The same job (default ``recipe=bench_gpt``: 27.8 M parameters, DP=4 on 4 CPU ranks, 2
distributed-optimizer instances) runs three times:

1. *reference*: ``torchrun``, no fault, ``trainer.max_steps = kill_step + 3``;
2. *checkpointless*: ``ncl-launch --spares 1 checkpointless=tier4``, rank 1 SIGKILLed at
   ``kill_step`` (phase optimizer). Total = ``summary.json`` ``recoveries[0].total_s``:
   kill -> first step completed after it; phases from the same record;
3. *checkpoint-restart*: ``torchrun --max-restarts 1 checkpointless=off
   restart.enabled=true restart.checkpoint_interval=K``, the same kill. Every process
   restarts, loads the checkpoint of step ``K * floor((S-1)/K)``, reads and discards the
   consumed batches and replays the steps since the checkpoint. Phases from
   ``restart_events.jsonl`` (``nemo_checkpointless/lab/restart.py``):
   ``detect_teardown`` (kill -> the new rank 0 process exists: torchrun notices the death,
   SIGTERMs the other ranks, waits for them, re-rendezvous, spawns), ``restart_imports``
   (Python, torch, megatron, Hydra), ``init`` (the world group), ``build`` (model, DDP,
   optimizer, dataset), ``load`` (checkpoint read), ``skip`` (data loader skipped forward),
   ``replay`` (the steps since the checkpoint, up to the one committed at the kill),
   ``first_step`` (the first step after it).

The same point is measured on both sides. The kill lands after step S's commit barrier
(``recovery/commit.py``), so every rank had S's final gradients: checkpointless keeps S
(the survivors applied it, the replacement receives it) and its first step afterwards is
S+1; checkpoint-restart loses S with the rest of memory and replays it. Each *total* runs
from the kill to the end of the first step that was not committed at the kill (T = S+1;
T = S for a kill before the barrier, read from checkpointless' agreed ``committed_step``),
so both totals contain one step of new work.

Two ratios, the strict one first (``_recovery_report.ratios``):

* ``ratio_of_totals`` = total ours / total checkpoint-restart: the step of new work stays
  in both (it is the same step on both sides, so it can only pull the ratio towards 1);
* ``ratio_one_step_subtracted`` = (total - one fault-free step) ours / the same for
  checkpoint-restart: the time the failure cost, with the median wall time between
  commits of the fault-free reference run taken as the fault-free step. Favourable to
  checkpointless, whose total is mostly that step.

The printed output and the JSON also say what was measured: the parallel layout (from
the run's ``summary.json``; a DP-only layout is the one where the warm spare builds its
model ahead, before it knows its rank) and the size of the optimizer state (fp32 main
parameters and Adam moments, summed over the ranks by the restart run's checkpoint load:
with N distributed-optimizer instances that sum holds N copies, so one copy is 1/N of it).

Both recovered runs are checked against the reference: ``state_sha256`` and every
``loss_hex`` (one metrics row per step). Writes a stacked bar chart (``--plot``, default
``docs/img/recovery.png``). Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _recovery_report as report  # noqa: E402
from _proc import run_in_session  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "recipes" / "pretrain.py"
OURS_PHASES = ("detect", "abort", "rendezvous", "group_rebuild", "state_transfer", "first_step")
RESTART_PHASES = ("detect_teardown", "restart_imports", "init", "build", "load", "skip",
                  "replay", "first_step")


def free_port() -> int:
    sys.path.insert(0, str(REPO))
    from nemo_checkpointless.comm.world import free_port as _free_port

    return _free_port()


def bench_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(cmd: list[str], log: Path, timeout: float) -> None:
    t0 = time.monotonic()
    code = run_in_session(cmd, log, cwd=REPO, env=bench_env(), timeout=timeout)
    if code != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed ({code}); log {log}:\n{tail}")
    print(f"  {log.stem}: {time.monotonic() - t0:.0f} s", flush=True)


def torchrun_cmd(overrides: list[str], run_dir: Path, max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
            "--max-restarts", str(max_restarts), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(PRETRAIN), *overrides,
            f"hydra.run.dir={run_dir}"]


def ncl_launch_cmd(overrides: list[str], run_dir: Path, spares: int,
                   hang_timeout: float) -> list[str]:
    return [sys.executable, "-m", "nemo_checkpointless.launch.agent", "--nproc-per-node", "4",
            "--spares", str(spares), "--master-port", str(free_port()),
            "--hang-timeout", f"{hang_timeout:g}", str(PRETRAIN),
            *overrides, f"hydra.run.dir={run_dir}"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare(run_dir: Path, reference: Path) -> dict:
    """Is ``run_dir`` bit for bit the reference run: state hash and every loss row."""
    rows, ref_rows = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    state = json.loads((run_dir / "summary.json").read_text())["state_sha256"]
    ref_state = json.loads((reference / "summary.json").read_text())["state_sha256"]
    one_row_per_step = [r["step"] for r in rows] == list(range(1, len(ref_rows) + 1))
    losses = [r["loss_hex"] for r in rows] == [r["loss_hex"] for r in ref_rows]
    return {"state_sha256_equal": state == ref_state, "loss_hex_equal": losses,
            "one_row_per_step": one_row_per_step,
            "exact": state == ref_state and losses and one_row_per_step}


def restart_phases(run_dir: Path, target: int) -> dict:
    """Phases of the first restart from restart_events.jsonl (rank 0's view), from the kill
    to the end of step ``target``."""
    events = read_jsonl(run_dir / "restart_events.jsonl")
    fault = next(e for e in events if e["event"] == "fault")
    after = [e for e in events if e["attempt"] == fault["attempt"] + 1 and e["rank"] == 0]
    at = {e["event"]: e["t"] for e in after if e["event"] != "step"}
    steps = {e["step"]: e["t"] for e in after if e["event"] == "step"}
    loaded = next(e for e in after if e["event"] == "checkpoint_loaded")
    replay_end = steps.get(target - 1, at["data_skipped"])
    marks = [fault["t"], at["process_start"], at["imports_done"], at["world_ready"],
             at["model_built"], at["checkpoint_loaded"], at["data_skipped"],
             max(replay_end, at["data_skipped"]), steps[target]]
    phases = {name: round(b - a, 3) for name, a, b in zip(RESTART_PHASES, marks, marks[1:])}
    return {"total_s": round(steps[target] - fault["t"], 3), "phases": phases,
            "checkpoint_step": loaded["checkpoint_step"], "checkpoint_bytes": loaded["bytes"],
            "replayed_steps": max(0, target - 1 - loaded["checkpoint_step"])}


def fault_free_step_s(reference: Path) -> float:
    """Median wall time between consecutive commits of the fault-free run (``time`` of
    its metrics rows, steps 3 on: the first two warm up)."""
    rows = read_jsonl(reference / "metrics.jsonl")
    gaps = [b["time"] - a["time"] for a, b in zip(rows, rows[1:]) if a["step"] >= 2]
    if not gaps:
        raise SystemExit(f"{reference}/metrics.jsonl has no `time` per row (made by an older "
                         "version): run again without --reuse")
    return statistics.median(gaps)


def ours_phases(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    rec = summary["recoveries"][0]
    events = read_jsonl(run_dir / "events.jsonl")
    transfer = next((e for e in events if e.get("phase") == "state_transfer"), {})
    return {"total_s": round(rec["total_s"], 3),
            "committed_step": transfer.get("committed_step"),
            "phases": {k: round(rec["phases"][k], 3) for k in
                       sorted(rec["phases"], key=lambda k: (k not in OURS_PHASES,
                              OURS_PHASES.index(k) if k in OURS_PHASES else 0))},
            "transfer_bytes": transfer.get("bytes", 0)}


def mean_step_s(run_dir: Path) -> float:
    rows = read_jsonl(run_dir / "metrics.jsonl")[2:]
    return sum(r["step_time_s"] for r in rows) / max(1, len(rows))


def plot(ours: dict, restart: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.6))
    cmap = plt.get_cmap("tab20")
    color = 0
    longest = max(restart["total_s"], ours["total_s"])
    for row, (label, data) in enumerate((("restart", restart), ("ours", ours))):
        left = 0.0
        for name, seconds in data["phases"].items():
            ax.barh(row, seconds, left=left, color=cmap(color % 20), edgecolor="white",
                    label=f"{label}: {name} ({seconds:.2f} s)")
            if seconds > 0.08 * longest:
                ax.text(left + seconds / 2, row, name, ha="center", va="center", fontsize=7)
            left += seconds
            color += 1
        ax.text(left + 0.2, row, f"{data['total_s']:.2f} s", va="center", fontsize=9)
    ax.set_yticks([0, 1], ["checkpoint-restart", "checkpointless"])
    ax.set_xlabel("seconds from the kill to the end of the first step not committed at the kill")
    fig.suptitle(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlim(0, longest * 1.15)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="bench_gpt")
    parser.add_argument("--interval", type=int, default=10, help="checkpoint every K steps")
    parser.add_argument("--kill-step", type=int, default=15, help="rank 1 is killed at step S")
    parser.add_argument("--extra-steps", type=int, default=3, help="steps after S")
    parser.add_argument("--spares", type=int, default=1)
    parser.add_argument("--hang-timeout", type=float, default=30.0,
                        help="ncl-launch --hang-timeout: a loaded 2-core machine stalls ranks "
                             "for seconds, and a silent rank is not a hung one")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "recovery.png")
    parser.add_argument("--timeout", type=float, default=1200, help="per run, seconds")
    parser.add_argument("--reuse", action="store_true",
                        help="do not run: analyse the runs already in --workdir")
    args = parser.parse_args()
    if args.reuse and args.workdir is None:
        parser.error("--reuse needs --workdir")
    if args.kill_step <= args.interval:
        parser.error("--kill-step must be after the first checkpoint (> --interval)")
    steps = args.kill_step + args.extra_steps
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ncl-bench-recovery-cmp-"))
    work.mkdir(parents=True, exist_ok=True)
    base = [f"recipe={args.recipe}", f"trainer.max_steps={steps}"]
    fault = f"fault.plan=[{{rank:1,step:{args.kill_step},phase:optimizer,kind:kill}}]"
    print(f"recipe={args.recipe}, {steps} steps, checkpoint every {args.interval}, rank 1 "
          f"killed at step {args.kill_step}; runs in {work}", flush=True)

    ref_dir, ours_dir, restart_dir = work / "reference", work / "ours", work / "restart"
    if not args.reuse:
        run(torchrun_cmd(base, ref_dir), work / "reference.log", args.timeout)
        run(ncl_launch_cmd([*base, "checkpointless=tier4", fault], ours_dir, args.spares,
                           args.hang_timeout),
            work / "ours.log", args.timeout)
        run(torchrun_cmd([*base, "restart.enabled=true",
                          f"restart.checkpoint_interval={args.interval}", fault], restart_dir,
                         max_restarts=1), work / "restart.log", args.timeout)

    ours = ours_phases(ours_dir)
    committed = ours["committed_step"]
    target = (committed if committed is not None else args.kill_step) + 1
    restart = restart_phases(restart_dir, target)
    ours["exactness"] = compare(ours_dir, ref_dir)
    restart["exactness"] = compare(restart_dir, ref_dir)
    step_s = mean_step_s(ref_dir)
    free_step = fault_free_step_s(ref_dir)
    r = report.ratios(ours["total_s"], restart["total_s"], free_step)
    summary = json.loads((ours_dir / "summary.json").read_text())
    layout = summary.get("layout", {})
    instances = int(layout.get("num_distributed_optimizer_instances", 1))
    sizes = report.state_sizes(restart["checkpoint_bytes"], instances)
    measured = (f"{report.layout_text(layout, summary.get('world_size'))}; "
                f"{report.state_text(sizes)}")
    for line in report.headline(r, ours["total_s"], restart["total_s"], free_step, target):
        print(line)
    print(f"measured: {args.recipe}, {measured}")
    for label, data in (("checkpointless", ours), ("checkpoint-restart", restart)):
        print(f"{label}: {data['total_s']:.2f} s to the end of step {target}, exact: "
              f"{data['exactness']['exact']}")
        for name, seconds in data["phases"].items():
            print(f"  {name:16s} {seconds:7.3f} s")
    print(f"checkpoint-restart loaded the checkpoint of step {restart['checkpoint_step']} and "
          f"replayed {restart['replayed_steps']} steps; checkpointless moved "
          f"{ours['transfer_bytes'] / 1e6:.0f} MB from peers; step {committed} was committed "
          f"at the kill; fault-free step {free_step:.2f} s (wall, median of the reference run)")
    plot(ours, restart, args.plot,
         f"{args.recipe}, {report.layout_text(layout, summary.get('world_size'))}\n"
         f"{report.state_text(sizes)}; rank 1 SIGKILLed at step {args.kill_step}, checkpoint "
         f"every {args.interval} steps\nratio of totals {r['ratio_of_totals']:.3f} (strict); "
         f"with one fault-free step subtracted {r['ratio_one_step_subtracted']:.3f}")
    print(json.dumps({
        "ratio_of_totals": round(r["ratio_of_totals"], 4),
        "ratio_one_step_subtracted": round(r["ratio_one_step_subtracted"], 4),
        "ours_s": ours["total_s"], "restart_s": restart["total_s"], "target_step": target,
        "ours_recovery_s": round(r["ours_recovery_s"], 3),
        "restart_recovery_s": round(r["restart_recovery_s"], 3),
        "layout": layout, "world_size": summary.get("world_size"),
        "spare_prebuilds_model": report.dp_only(layout),
        "state_mb": round(sizes["state_mb"], 1),
        "state_mb_with_replicas": round(sizes["state_mb_with_replicas"], 1),
        "measured": measured,
        "committed_step_at_kill": committed, "fault_free_step_s": free_step,
        "ours_phases": ours["phases"], "restart_phases": restart["phases"],
        "state_bytes": restart["checkpoint_bytes"], "transfer_bytes": ours["transfer_bytes"],
        "K": args.interval, "kill_step": args.kill_step, "max_steps": steps,
        "checkpoint_step": restart["checkpoint_step"],
        "replayed_steps": restart["replayed_steps"], "mean_step_s": round(step_s, 3),
        "recipe": args.recipe, "ours_exact": ours["exactness"]["exact"],
        "restart_exact": restart["exactness"]["exact"],
        "ours_exactness": ours["exactness"], "restart_exactness": restart["exactness"],
        "plot": str(args.plot)}))


if __name__ == "__main__":
    main()
