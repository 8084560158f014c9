"""Goodput under failure: a seeded chaos schedule against checkpointless and checkpoint-restart.

    .venv/bin/python scripts/bench/goodput.py [--duration 600] [--mtbf 60] [--seed 0]
    .venv/bin/python scripts/bench/goodput.py --duration 60          # development run

One seeded schedule of failures (exponential inter-arrival times with mean ``--mtbf``
seconds; each failure kills one rank process with SIGKILL, or with probability
``--node-fraction`` a whole node: its agent and every process of it) is played against:

* **checkpointless**: 2 ``ncl-launch`` agents x 2 ranks on this machine (``--nnodes 2
  --node-rank 0/1 --peers``, ``--spares 1`` each), ``checkpointless=tier4``. A rank kill
  SIGKILLs the rank's current process (pids from the agent's log: ``started rank R (pid
  P)`` and ``warm spare pid P takes rank R``); a node kill SIGKILLs the agent's process
  group. A warm standby node (``ncl-launch --standby``, started with the job) takes the
  lost node over by itself, and a new standby is started 10 s later, as a scheduler would
  bring a new spare node (``--no-standby``: a replacement agent for the same
  ``--node-rank`` is started at once instead, and its ranks start cold).
* **checkpoint-restart**: ``torchrun --max-restarts 1000`` of the same 4 ranks with
  ``checkpointless=off restart.enabled=true restart.checkpoint_interval=K`` (see
  ``scripts/bench/recovery.py``). A node kill is SIGKILL of both ranks of that node.

Time is counted from the start of the first step (the driver polls ``metrics.jsonl``; the
job's start-up before its first step is the same with or without failures and is left
out). A failure that falls due while the job has not completed a step since the previous
failure waits until it has (failures hit a running job, not a recovering one).

* ``goodput`` = time the steps that count would take without failures / wall time of the
  chaos run = (fault-free reference run's time for the same ``max_steps``) / (chaos run's
  time). Everything else (detection, recovery, restarts, replays, redone steps, checkpoint
  writes, the tiers' steady overhead) is lost time. The fault-free reference (torchrun,
  ``checkpointless=off``) runs once before and once after the chaos runs, and their mean
  is used (``--references 2``, the default): this VM's speed drifts by several percent
  over the ~45 minutes, and a single reference on one side charges or credits that drift
  to the chaos runs. Both references, the drift between them and the goodput against
  each are printed.
* ``lost_steps``: committed steps whose result was thrown away (checkpoint-restart: the
  steps after the checkpoint, dropped from metrics.jsonl at each resume; checkpointless:
  none, by the commit protocol; a step in flight at a failure is redone by both and counts
  as lost time only).

``max_steps`` = duration / step time, measured first with a short fault-free run. Both
chaos runs, and the second reference, end compared with the first fault-free reference
of the same ``max_steps`` (``state_sha256`` and every ``loss_hex``). Plot: steps completed over time for the three
runs with the failures marked (``--plot``, default ``docs/img/goodput.png``). Last line: JSON.

Default recipe: ``tiny_gpt_2opt`` (4 ranks, DP=4, 2 optimizer instances, the replicas
tier 4 needs): its 0.4 s step gives a 10-minute run over a thousand steps and keeps the
whole benchmark (calibration, reference, two chaos runs) near 35 minutes on 2 cores;
``--recipe bench_gpt`` (27.8 M parameters, 4x the state) works the same, 5x slower per step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery import PRETRAIN, REPO, bench_env, compare, free_port, read_jsonl, torchrun_cmd  # noqa: E402
from nemo_checkpointless.metrics.goodput import Failure, Trace, failure_costs, in_run_goodput  # noqa: E402

NNODES, NPROC = 2, 2
WORLD = NNODES * NPROC


class RunFailed(RuntimeError):
    """A run did not finish (job exit code, or timeout); the message says where to look."""


def make_schedule(seed: int, mtbf: float, horizon: float, node_fraction: float) -> list[Failure]:
    """Exponential inter-arrival times (mean ``mtbf``) up to ``horizon`` seconds; seeded."""
    rng = random.Random(seed)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(1.0 / mtbf)
        if t > horizon:
            return out
        if rng.random() < node_fraction:
            out.append(Failure(t, "node", rng.randrange(NNODES)))
        else:
            out.append(Failure(t, "rank", rng.randrange(WORLD)))


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc; no psutil)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields_ = stat.rsplit(")", 1)[1].split()
        if fields_[0] == "Z":
            continue
        children.setdefault(int(fields_[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def env_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0")
                if "=" in item)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class CheckpointlessJob:
    """2 ncl-launch agents x 2 ranks (one per simulated node), tier 4, warm spares."""

    def __init__(self, overrides: list[str], run_dir: Path, spares: int,
                 fallback: str = "none", standby: bool = True) -> None:
        self.run_dir, self.spares, self.standby = run_dir, spares, standby
        self.standby_proc: Optional[subprocess.Popen] = None
        self.standby_log: Optional[Path] = None
        self.standby_due: Optional[float] = None
        self.overrides = [*overrides, "checkpointless=tier4",
                          f"checkpointless.fallback={fallback}", f"hydra.run.dir={run_dir}"]
        self.peers = ",".join(f"127.0.0.1:{free_port()}" for _ in range(NNODES))
        self.env = bench_env()
        self.env.update(NCL_JOB_ID="goodput-" + secrets.token_hex(3),
                        NCL_JOB_SECRET=secrets.token_hex(16))
        self.agents: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, Path] = {}
        self.starts = 0
        run_dir.parent.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        for node in range(NNODES):
            self._start_agent(node)
        if self.standby:
            self._start_standby()

    def _start_standby(self) -> None:
        """A warm standby node (``ncl-launch --standby``): takes over the next lost node."""
        log = self.run_dir.parent / f"{self.run_dir.name}-standby-{self.starts}.log"
        self.starts += 1
        cmd = [sys.executable, "-m", "nemo_checkpointless.launch.agent", "--standby",
               "--nnodes", str(NNODES), "--nproc-per-node", str(NPROC), "--peers", self.peers,
               "--standby-host", "127.0.0.1", "--spares", str(self.spares), str(PRETRAIN),
               *self.overrides]
        self.standby_log = log
        self.standby_proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=open(log, "w"),
                                             stderr=subprocess.STDOUT, start_new_session=True)

    def _start_agent(self, node: int) -> None:
        log = self.run_dir.parent / f"{self.run_dir.name}-agent{node}-{self.starts}.log"
        self.starts += 1
        cmd = [sys.executable, "-m", "nemo_checkpointless.launch.agent", "--nnodes", str(NNODES),
               "--nproc-per-node", str(NPROC), "--node-rank", str(node), "--peers", self.peers,
               "--spares", str(self.spares), str(PRETRAIN), *self.overrides]
        self.logs[node] = log
        self.agents[node] = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=open(log, "w"),
                                             stderr=subprocess.STDOUT, start_new_session=True)

    def rank_pid(self, rank: int) -> Optional[int]:
        """The live process that holds ``rank`` now, from its agent's log."""
        text = self.logs[rank // NPROC].read_text(errors="replace")
        pid = None
        for m in re.finditer(r"started rank (\d+) \(pid (\d+)\)|warm spare pid (\d+) takes "
                             r"rank (\d+)", text):
            r, p = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
            if int(r) == rank:
                pid = int(p)
        return pid if pid is not None and alive(pid) else None

    def fail(self, f: Failure) -> str:
        if f.kind == "rank":
            pid = self.rank_pid(f.target)
            if pid is None:
                return "no live process for the rank (skipped)"
            kill(pid)
            return f"SIGKILL rank {f.target} (pid {pid})"
        agent = self.agents[f.target]
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
        if self.standby and self.standby_proc is not None and self.standby_proc.poll() is None:
            # the standby takes the node over by itself; the "scheduler" brings a new spare
            # node a little later (its imports would compete with the recovery for the cores)
            self.agents[f.target] = self.standby_proc
            self.logs[f.target] = self.standby_log  # type: ignore[assignment]
            self.standby_proc = None
            self.standby_due = time.monotonic() + 10.0
            return f"SIGKILL node {f.target} (agent {agent.pid} and its ranks), standby takes over"
        self._start_agent(f.target)
        return f"SIGKILL node {f.target} (agent {agent.pid} and its ranks), replacement started"

    def poll(self) -> Optional[int]:
        """None while running; else the exit code (the max over agents)."""
        if self.standby_due is not None and time.monotonic() >= self.standby_due:
            self.standby_due = None
            self._start_standby()
        codes = [p.poll() for p in self.agents.values()]
        if any(c is None for c in codes):
            if any(c not in (None, 0) for c in codes):
                return max(c for c in codes if c is not None)  # a failed agent: job is lost
            return None
        return max(codes)

    def stop(self) -> None:
        for p in [*self.agents.values(), *([self.standby_proc] if self.standby_proc else [])]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


class RestartJob:
    """torchrun --max-restarts of the 4 ranks, stock checkpoint-restart."""

    def __init__(self, overrides: list[str], run_dir: Path, interval: int) -> None:
        self.run_dir = run_dir
        self.cmd = torchrun_cmd([*overrides, "restart.enabled=true",
                                 f"restart.checkpoint_interval={interval}"], run_dir,
                                max_restarts=1000)
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        log = self.run_dir.parent / f"{self.run_dir.name}.log"
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=bench_env(), stdout=open(log, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def _rank_pids(self) -> dict[int, int]:
        assert self.proc is not None
        out = {}
        for pid in descendants(self.proc.pid):
            env = env_of(pid)
            if "RANK" in env and "TORCHELASTIC_RESTART_COUNT" in env:
                out[int(env["RANK"])] = pid
        return out

    def fail(self, f: Failure) -> str:
        pids = self._rank_pids()
        ranks = [f.target] if f.kind == "rank" else list(range(f.target * NPROC,
                                                                 (f.target + 1) * NPROC))
        hit = [(r, pids[r]) for r in ranks if r in pids]
        if not hit:
            return "no live rank process (skipped)"
        for _, pid in hit:
            kill(pid)
        return f"SIGKILL {'rank' if f.kind == 'rank' else f'node {f.target}: ranks'} " + \
            ", ".join(f"{r} (pid {p})" for r, p in hit)

    def poll(self) -> Optional[int]:
        assert self.proc is not None
        return self.proc.poll()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def last_row(path: Path, tail: int = 8192) -> Optional[dict]:
    """The file's last complete row, read from its last ``tail`` bytes only: the driver
    polls every 50 ms, and reading a whole metrics file that grows by a row a step would
    cost the 2-core machine more CPU the longer a run lasts."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail))
            lines = [l for l in f.read().splitlines() if l.strip()]
    except OSError:
        return None
    for line in reversed(lines):  # the newest line may be half written, the first cut
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def drive(job, run_dir: Path, max_steps: int, schedule: list[Failure], timeout: float,
          label: str) -> Trace:
    """Run ``job`` to the end, firing ``schedule``; return what happened and when."""
    trace = Trace()
    metrics = run_dir / "metrics.jsonl"
    pending = [Failure(f.at, f.kind, f.target) for f in schedule]
    job.start()
    start = time.monotonic()
    t_first = None
    last_step, step_at_last_failure = 0, -1
    try:
        while True:
            now = time.monotonic()
            if now - start > timeout:
                raise RunFailed(f"{label}: not finished after {timeout:.0f} s; see {run_dir}")
            code = job.poll()
            row = last_row(metrics)
            step = row["step"] if row else 0
            if t_first is None and row is not None:
                t_first = now - row["step_time_s"]
            if step != last_step:
                if step < last_step:
                    trace.lost_steps += last_step - step
                last_step = step
                if t_first is not None:
                    trace.points.append((now - t_first, step))
            if code is not None:
                if code != 0:
                    raise RunFailed(f"{label}: job failed with exit code {code}; see "
                                    f"{run_dir.parent} ({run_dir.name}*.log)")
                break
            # a failure hits a running job: it waits for 2 steps past the last failure's
            # (a dying job can still log one step: rank 0 commits locally before it stalls)
            if (t_first is not None and pending and now - t_first >= pending[0].at
                    and last_step >= step_at_last_failure + 2 and last_step < max_steps):
                f = pending.pop(0)
                f.fired_at, f.last_step = now - t_first, last_step
                what = job.fail(f)
                print(f"  {label} t={f.fired_at:6.1f}s step {last_step}: {what}", flush=True)
                if "skipped" not in what:
                    trace.failures.append(f)
                    step_at_last_failure = last_step
            time.sleep(0.05)
    finally:
        job.stop()
    trace.t_first = 0.0
    trace.t_end = (time.monotonic() - t_first) if t_first is not None else 0.0
    if trace.points and trace.points[-1][1] == max_steps:
        trace.t_end = trace.points[-1][0]  # the last step's end, as seen by polling
    return trace


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
    trace = drive(_Once(torchrun_cmd([*base, f"trainer.max_steps={steps}"], run_dir), run_dir),
                  run_dir, steps, [], timeout, "calibrate")
    pts = [p for p in trace.points if p[1] >= 2]
    if len(pts) >= 2:
        return (pts[-1][0] - pts[0][0]) / (pts[-1][1] - pts[0][1])
    return trace.t_end / steps


class _Once:
    """A fault-free job for :func:`drive` (one command)."""

    def __init__(self, cmd: list[str], run_dir: Path) -> None:
        self.cmd, self.run_dir = cmd, run_dir
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        log = self.run_dir.parent / f"{self.run_dir.name}.log"
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=bench_env(), stdout=open(log, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def poll(self) -> Optional[int]:
        assert self.proc is not None
        return self.proc.poll()

    def fail(self, f: Failure) -> str:
        return "skipped"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0,
                        help="seconds of training the chaos run should last at least")
    parser.add_argument("--mtbf", type=float, default=60.0, help="mean time between failures, s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", default="tiny_gpt_2opt")
    parser.add_argument("--node-fraction", type=float, default=0.25,
                        help="probability that a failure kills a whole node (agent + ranks)")
    parser.add_argument("--interval", type=int, default=10,
                        help="checkpoint-restart: checkpoint every K steps")
    parser.add_argument("--spares", type=int, default=1, help="warm spares per agent")
    parser.add_argument("--fallback", choices=("none", "disk"), default="none",
                        help="checkpointless.fallback: disk survives losing both replicas "
                             "of a shard at once (tier 4 alone stops the job, exit 3)")
    parser.add_argument("--no-standby", action="store_true",
                        help="checkpointless: replace a lost node by a new agent for its node "
                             "rank (cold start) instead of a warm standby node")
    parser.add_argument("--references", type=int, choices=(1, 2), default=2,
                        help="fault-free reference runs: 2 = one before and one after the "
                             "chaos runs, averaged (cancels the machine's drift); 1 = before")
    parser.add_argument("--step-s", type=float, default=None,
                        help="step time to size max_steps (default: measured first)")
    parser.add_argument("--modes", default="checkpointless,checkpoint-restart")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "goodput.png")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ncl-bench-goodput-"))
    work.mkdir(parents=True, exist_ok=True)
    base = [f"recipe={args.recipe}"]
    timeout_of = lambda seconds: 600 + 10 * seconds  # noqa: E731 - generous, never hit when healthy

    step_s = args.step_s or calibrate(base, work, 12, timeout_of(60))
    max_steps = max(10, math.ceil(args.duration / step_s))
    overrides = [*base, f"trainer.max_steps={max_steps}"]
    schedule = make_schedule(args.seed, args.mtbf, horizon=20 * args.duration,
                             node_fraction=args.node_fraction)
    print(f"recipe={args.recipe}: step {step_s:.3f} s -> max_steps={max_steps}; mtbf "
          f"{args.mtbf:.0f} s, seed {args.seed}; first failures at "
          + ", ".join(f"{f.at:.0f}s {f.kind} {f.target}" for f in schedule[:6])
          + f"; runs in {work}", flush=True)

    ref_dir = work / "reference"
    traces: dict[str, Trace] = {}

    def reference(run_dir: Path, label: str) -> Trace:
        trace = drive(_Once(torchrun_cmd(overrides, run_dir), run_dir), run_dir, max_steps, [],
                      timeout_of(args.duration), label)
        print(f"  {label}: {trace.t_end:.1f} s for {max_steps} steps", flush=True)
        return trace

    traces["fault-free"] = reference(ref_dir, "fault-free")
    results: dict[str, dict] = {}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        run_dir = work / mode
        if mode == "checkpointless":
            job = CheckpointlessJob(overrides, run_dir, args.spares, args.fallback,
                                    standby=not args.no_standby)
        elif mode == "checkpoint-restart":
            job = RestartJob(overrides, run_dir, args.interval)
        else:
            parser.error(f"--modes: unknown mode {mode!r}")
        try:
            trace = drive(job, run_dir, max_steps, schedule, timeout_of(args.duration), mode)
        except RunFailed as err:  # report it and go on with the other mode
            print(f"  {mode}: FAILED: {err}", flush=True)
            results[mode] = {"goodput": 0.0, "error": str(err), "exact": False}
            continue
        traces[mode] = trace
        lost = restart_lost_steps(run_dir) if mode == "checkpoint-restart" else trace.lost_steps
        exact = compare(run_dir, ref_dir)
        costs = failure_costs(trace)
        results[mode] = {
            "in_run": in_run_goodput(trace, costs), "failure_costs_s": costs,
            "wall_s": round(trace.t_end, 1), "lost_steps": lost,
            "failures": len(trace.failures),
            "node_failures": sum(f.kind == "node" for f in trace.failures),
            "exact": exact["exact"], "exactness": exact}
        print(f"  {mode}: {trace.t_end:.1f} s, {len(trace.failures)} failures, {lost} "
              f"committed steps lost, exact {exact['exact']}", flush=True)

    # The fault-free time is measured before and after the chaos runs and averaged: this
    # shared VM's speed drifts by several percent over the half hour they take, and one
    # reference on one side would charge (or credit) that drift to the chaos runs.
    ref_times = [traces["fault-free"].t_end]
    if args.references == 2:
        after_dir = work / "reference-after"
        after = reference(after_dir, "fault-free, after")
        ref_times.append(after.t_end)
        results["reference-after"] = {"exact": compare(after_dir, ref_dir)["exact"]}
    ref_time = sum(ref_times) / len(ref_times)
    drift = ref_times[-1] / ref_times[0] - 1
    print(f"  fault-free time {ref_time:.1f} s (" + " and ".join(f"{t:.1f}" for t in ref_times)
          + f"; the machine drifted {100 * drift:+.1f}% between them)", flush=True)
    for mode, r in results.items():
        if "wall_s" in r:
            r["goodput"] = round(ref_time / r["wall_s"], 4)
            r["goodput_vs_each"] = [round(t / r["wall_s"], 4) for t in ref_times]
            print(f"  {mode}: goodput {r['goodput']:.3f} (vs each fault-free run: "
                  + ", ".join(f"{g:.3f}" for g in r["goodput_vs_each"])
                  + f"); in-run {r['in_run']:.3f} (failures cost " + ", ".join(
                      "?" if c is None else f"{c:.2f}" for c in r["failure_costs_s"])
                  + " s)", flush=True)

    ours = results.get("checkpointless", {})
    restart = results.get("checkpoint-restart", {})
    plot(traces, args.plot,
         f"{args.recipe}, 4 CPU ranks, mtbf {args.mtbf:.0f} s (seed {args.seed}), "
         f"{max_steps} steps; goodput checkpointless {ours.get('goodput', 0):.3f}, "
         f"checkpoint-restart {restart.get('goodput', 0):.3f} (K={args.interval})")
    print(json.dumps({
        "goodput": ours.get("goodput"), "restart_goodput": restart.get("goodput"),
        "goodput_in_run": ours.get("in_run"), "restart_goodput_in_run": restart.get("in_run"),
        "failure_costs_s": ours.get("failure_costs_s"),
        "restart_failure_costs_s": restart.get("failure_costs_s"),
        "lost_steps": ours.get("lost_steps"), "restart_lost_steps": restart.get("lost_steps"),
        "failures": ours.get("failures"), "restart_failures": restart.get("failures"),
        "node_failures": ours.get("node_failures"),
        "restart_node_failures": restart.get("node_failures"),
        "wall_s": ours.get("wall_s"), "restart_wall_s": restart.get("wall_s"),
        "fault_free_s": round(ref_time, 1),
        "fault_free_runs_s": [round(t, 1) for t in ref_times],
        "machine_drift": round(drift, 4),
        "goodput_vs_each": ours.get("goodput_vs_each"),
        "restart_goodput_vs_each": restart.get("goodput_vs_each"),
        "reference_after_exact": results.get("reference-after", {}).get("exact"),
        "exact": ours.get("exact"),
        "restart_exact": restart.get("exact"), "max_steps": max_steps,
        "step_s": round(step_s, 3), "mtbf_s": args.mtbf, "seed": args.seed,
        "duration_s": args.duration, "recipe": args.recipe, "K": args.interval,
        "spares": args.spares, "fallback": args.fallback, "node_fraction": args.node_fraction,
        "schedule": [{"at": round(f.at, 1), "kind": f.kind, "target": f.target}
                     for f in schedule if f.at <= 2 * args.duration],
        "fired": {m: [{"t": round(f.fired_at or 0, 1), "kind": f.kind, "target": f.target,
                       "step": f.last_step} for f in t.failures]
                  for m, t in traces.items() if m != "fault-free"},
        "errors": {m: r["error"] for m, r in results.items() if "error" in r},
        "plot": str(args.plot)}))


if __name__ == "__main__":
    main()
