"""What the job tests of every venv share: a finished job's files, one job run in its own
process group, and several ncl-launch agents on this machine as the nodes of one job.

Standard library only: tests/conftest.py (core venv), tests/nemo/nemo_jobs.py (.venv-nemo),
tests/bridge/bridge_runs.py (.venv-latest) and tests/e2e build on it; each adds its own
commands and environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class FinishedJob:
    """A finished job: exit code, output, and the files rank 0 wrote."""

    returncode: int
    output: str
    run_dir: Path

    @property
    def metrics(self) -> list[dict]:
        return _rows(self.run_dir / "metrics.jsonl")

    @property
    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    @property
    def events(self) -> list[dict]:
        return _rows(self.run_dir / "events.jsonl")

    def check(self):
        assert self.returncode == 0, self.output[-8000:]
        return self


def run_in_session(cmd: list[str], log: Path, *, cwd: Path, env: dict[str, str],
                   timeout: float) -> tuple[int, str]:
    """Run ``cmd`` in its own session with its output in ``log``; on timeout kill its whole
    process group (agent, ranks, spares) and say so in the returned output."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code = -9
    text = log.read_text()
    if code == -9:
        text += f"\n[test] {Path(cmd[0]).name} killed after {timeout}s timeout"
    return code, text


def free_port() -> int:
    """A free TCP port on the loopback (the package's, imported when first needed)."""
    from nemo_checkpointless.comm.world import free_port as pick

    return pick()


class AgentGroup:
    """ncl-launch agents on this machine, the nodes of one job: started one by one, each in
    its own session with its own log in the run dir's parent. A subclass names its entry
    script, arguments, environment, result type and timeouts."""

    result: type = FinishedJob  # what wait() returns
    step_timeout: float = 120  # wait_for_step's default
    wait_timeout: float = 300  # wait's default

    def __init__(self, run_dir: Path, env: dict[str, str], cwd: Path, *, nnodes: int,
                 nproc: int, entry: Path, args: list[str]) -> None:
        self.run_dir, self.env, self.cwd = run_dir, env, cwd
        self.nnodes, self.nproc, self.entry, self.args = nnodes, nproc, entry, args
        self.peers = ",".join(f"127.0.0.1:{free_port()}" for _ in range(nnodes))
        self.procs: dict[Any, subprocess.Popen] = {}
        self.logs: list[Path] = []
        run_dir.parent.mkdir(parents=True, exist_ok=True)

    def agent_command(self, *options: str, spares: int = 0,
                      peers: str | None = None) -> list[str]:
        """The agent's command line: the job's shape, ``options``, the entry and its args."""
        return [sys.executable, "-m", "nemo_checkpointless.launch.agent",
                "--nnodes", str(self.nnodes), "--nproc-per-node", str(self.nproc),
                "--peers", peers or self.peers, "--spares", str(spares), *options,
                str(self.entry), *self.args]

    def start(self, node: int, spares: int = 0, host: str | None = None,
              peers: str | None = None, options: tuple[str, ...] = ()) -> subprocess.Popen:
        """Start node ``node``'s agent; ``host``: as a replacement on another host (another
        loopback address) and port, named in its own peer list only; ``peers``: the peer
        list a scheduler gives a replacement (where each shard is served now);
        ``options``: more agent flags."""
        if host is not None:
            peers = peers or self.peers
            moved = peers.split(",")
            moved[node] = f"{host}:{free_port()}"
            peers = ",".join(moved)
        return self.launch(node, f"agent{node}", self.agent_command(
            "--node-rank", str(node), *options, spares=spares, peers=peers))

    def start_standby(self, port: int = 0, options: tuple[str, ...] = ()) -> subprocess.Popen:
        """A warm standby node: it takes over whichever node is lost first (its store shard
        then at 127.0.0.3:``port``; 0: a port it picks); ``options``: more agent flags."""
        return self.launch(f"standby-{len(self.logs) + 1}", "standby", self.agent_command(
            "--standby", "--standby-host", "127.0.0.3", "--standby-port", str(port),
            *options))

    def launch(self, key: Any, name: str, cmd: list[str]) -> subprocess.Popen:
        """Start ``cmd`` as ``procs[key]``, its output in ``<name>-<n>.log``."""
        log = self.run_dir.parent / f"{name}-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=self.cwd, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[key] = proc
        return proc

    def kill_node(self, node: int) -> None:
        from nemo_checkpointless.launch.agent import kill_node

        kill_node(self.procs[node].pid)
        self.procs[node].wait()

    def wait_for_step(self, step: int, timeout: float | None = None) -> None:
        timeout = timeout or self.step_timeout
        deadline = time.monotonic() + timeout
        path = self.run_dir / "metrics.jsonl"
        while time.monotonic() < deadline:
            if path.exists() and len(path.read_text().splitlines()) >= step:
                return
            time.sleep(0.05)
        raise TimeoutError(f"step {step} not reached in {timeout}s:\n{self.output()[-6000:]}")

    def output(self) -> str:
        return "\n".join(p.read_text() for p in self.logs if p.exists())

    def wait_all(self, timeout: float) -> tuple[int, str]:
        """Wait for every agent (``timeout`` for all together), kill what is left; the
        largest exit code (1 when none ran) and every log."""
        deadline = time.monotonic() + timeout
        codes = []
        try:
            for proc in self.procs.values():
                codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        finally:
            for proc in self.procs.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, 9)
        return (max(codes) if codes else 1), self.output()

    def wait(self, timeout: float | None = None) -> Any:
        """Every agent's end; the finished job as ``result``."""
        return self.result(*self.wait_all(timeout or self.wait_timeout), self.run_dir)

    def stop_after(self, step: int) -> tuple[Any, int]:
        """A stop request: SIGTERM to node 0's agent once ``step`` is done; the finished job
        (``wait()``, its exit code asserted to be 143) and the last step it completed."""
        self.wait_for_step(step)
        self.procs[0].send_signal(signal.SIGTERM)
        stopped = self.wait()
        assert stopped.returncode == 143, stopped.output[-8000:]
        return stopped, stopped.metrics[-1]["step"]
