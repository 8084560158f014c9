"""The chaos runs of ``goodput.py``: jobs that can be failed on schedule, and the driver
that plays a schedule against one and records what it saw.

* :class:`CheckpointlessJob`: 2 ``ncl-launch`` agents x 2 ranks, tier 4, warm spares, a
  warm standby node. A rank failure SIGKILLs the process that holds the rank now, found
  from the job's ``events.jsonl`` (``rank_process`` events: rank, pid, generation, written
  by the rank when it takes the rank); a node failure SIGKILLs the agent's process group.
* :class:`RestartJob`: ``torchrun --max-restarts`` of the same ranks (stock
  checkpoint-restart); its rank processes are found in torchrun's process tree (``RANK``
  in each child's environment).
* :class:`FaultFreeJob`: one command, never failed (references and calibration).
* :func:`drive`: start a job, poll rank 0's ``metrics.jsonl`` for the last committed
  step, fire the schedule's failures at a running job, and return the
  :class:`~nemo_checkpointless.metrics.goodput.Trace`.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery import PRETRAIN, REPO, bench_env, free_port, torchrun_cmd  # noqa: E402
from nemo_checkpointless.metrics.events import read_events  # noqa: E402
from nemo_checkpointless.metrics.goodput import Failure, Trace  # noqa: E402

NNODES, NPROC = 2, 2
WORLD = NNODES * NPROC


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


class RunFailed(RuntimeError):
    """A run did not finish (job exit code, or timeout); the message says where to look."""


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
                 fallback: str = "none", standby: bool = True,
                 hang_timeout: float = 30.0) -> None:
        self.run_dir, self.spares, self.standby = run_dir, spares, standby
        # ncl-launch --hang-timeout: a loaded 2-core machine stalls ranks for seconds, and a
        # silent rank is not a hung one
        self.timeouts = ["--hang-timeout", f"{hang_timeout:g}"]
        self.standby_proc: Optional[subprocess.Popen] = None
        self.standby_log: Optional[Path] = None
        self.standby_due: Optional[float] = None
        self.overrides = [*overrides, "checkpointless=tier4",
                          f"checkpointless.fallback={fallback}", f"hydra.run.dir={run_dir}"]
        # where each node's store shard is served now: a standby that takes a node over
        # moves it to its own address, and replacements and new standbys are given the
        # list as it is then (what scripts/slurm/supervise.sh does with peers_now)
        self.endpoints = [f"127.0.0.1:{free_port()}" for _ in range(NNODES)]
        self.standby_endpoint: Optional[str] = None
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

    @property
    def peers(self) -> str:
        return ",".join(self.endpoints)

    def _start_standby(self) -> None:
        """A warm standby node (``ncl-launch --standby``): takes over the next lost node."""
        log = self.run_dir.parent / f"{self.run_dir.name}-standby-{self.starts}.log"
        self.starts += 1
        port = free_port()
        self.standby_endpoint = f"127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "nemo_checkpointless.launch.agent", "--standby",
               "--nnodes", str(NNODES), "--nproc-per-node", str(NPROC), "--peers", self.peers,
               "--standby-host", "127.0.0.1", "--standby-port", str(port),
               "--spares", str(self.spares), *self.timeouts,
               str(PRETRAIN),
               *self.overrides]
        self.standby_log = log
        self.standby_proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=open(log, "w"),
                                             stderr=subprocess.STDOUT, start_new_session=True)

    def _start_agent(self, node: int) -> None:
        log = self.run_dir.parent / f"{self.run_dir.name}-agent{node}-{self.starts}.log"
        self.starts += 1
        cmd = [sys.executable, "-m", "nemo_checkpointless.launch.agent", "--nnodes", str(NNODES),
               "--nproc-per-node", str(NPROC), "--node-rank", str(node), "--peers", self.peers,
               "--spares", str(self.spares), *self.timeouts, str(PRETRAIN), *self.overrides]
        self.logs[node] = log
        self.agents[node] = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=open(log, "w"),
                                             stderr=subprocess.STDOUT, start_new_session=True)

    def rank_pid(self, rank: int) -> Optional[int]:
        """The live process that holds ``rank`` now: the newest ``rank_process`` event of
        the rank in the job's events.jsonl (written by the process when it takes the rank:
        at start, as a replacement, or as a warm spare handed the rank)."""
        held = [e for e in read_events(self.run_dir / "events.jsonl")
                if e.get("event") == "rank_process" and e.get("rank") == rank]
        if not held:
            return None
        pid = int(max(held, key=lambda e: (e.get("generation", -1), e["t"]))["pid"])
        return pid if alive(pid) else None

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
            assert self.standby_endpoint is not None
            self.endpoints[f.target] = self.standby_endpoint
            self.standby_proc, self.standby_endpoint = None, None
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


class FaultFreeJob:
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


