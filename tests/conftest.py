"""Shared fixtures: run the real entry point as real processes on free ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "recipes" / "pretrain.py"


def free_port() -> int:
    from nemo_checkpointless.comm.world import free_port as _free_port

    return _free_port()


@dataclass
class RunResult:
    """A finished run: exit code, output and the files rank 0 wrote."""

    returncode: int
    output: str
    run_dir: Path

    @property
    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    @property
    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    def check(self) -> "RunResult":
        assert self.returncode == 0, self.output[-6000:]
        return self


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("NCL_DATA_CACHE", str(Path.home() / ".cache" / "nemo_checkpointless" / "test-data"))
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    # CI machines have 2 cores shared by 4-8 processes: allow scheduling stalls before a
    # silent rank counts as hung (the hang tests still see SIGSTOPped ranks killed)
    env.setdefault("NCL_HANG_TIMEOUT_S", "8")
    return env


def torchrun(nproc: int, overrides: list[str], run_dir: Path, timeout: float = 240,
             env: dict[str, str] | None = None) -> RunResult:
    """``torchrun --nproc-per-node N recipes/pretrain.py ...`` on a free port."""
    full_env = _env()
    full_env.update(env or {})
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()),
        str(PRETRAIN), *overrides, f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(cmd, cwd=run_dir.parent, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    return RunResult(proc.returncode, proc.stdout + proc.stderr, run_dir)


def python_run(overrides: list[str], run_dir: Path, timeout: float = 120,
               env: dict[str, str] | None = None) -> RunResult:
    """``python recipes/pretrain.py ...`` as one process (world of one, or env-given)."""
    full_env = _env()
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, str(PRETRAIN), *overrides, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    return RunResult(proc.returncode, proc.stdout + proc.stderr, run_dir)


def run_job(cmd: list[str], run_dir: Path, env: dict[str, str], timeout: float) -> RunResult:
    """Run a job's command in its own session, output to ``<run_dir>-agent.log``; on
    timeout kill its whole process group (agent, ranks, spares) and say so."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}-agent.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=run_dir.parent, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code = -9
    text = log.read_text()
    if code == -9:
        text += f"\n[test] {Path(cmd[0]).name} killed after {timeout}s timeout"
    return RunResult(code, text, run_dir)


def ncl_launch(nproc: int, overrides: list[str], run_dir: Path, *, spares: int = 1,
               timeout: float = 300, agent_args: list[str] | None = None,
               env: dict[str, str] | None = None, script: Path = PRETRAIN) -> RunResult:
    """One ``ncl-launch`` agent (one node) running ``script`` (recipes/pretrain.py)."""
    cmd = [sys.executable, "-m", "nemo_checkpointless.launch.agent",
           "--nproc-per-node", str(nproc), "--spares", str(spares),
           "--master-port", str(free_port()), *(agent_args or []),
           str(script), *overrides, f"hydra.run.dir={run_dir}"]
    full_env = _env()
    full_env.update(env or {})
    return run_job(cmd, run_dir, full_env, timeout)


class FaultFreeRuns:
    """Fault-free reference runs, one per layout, made once per test session or module."""

    def __init__(self, tmp_path_factory: Any, base: list[str], layouts: dict[str, list[str]],
                 prefix: str) -> None:
        self.factory, self.base, self.layouts, self.prefix = tmp_path_factory, base, layouts, prefix
        self.cache: dict[str, RunResult] = {}

    def __call__(self, layout: str) -> RunResult:
        if layout not in self.cache:
            run_dir = self.factory.mktemp(f"{self.prefix}-{layout}") / "run"
            self.cache[layout] = ncl_launch(4, [*self.base, *self.layouts[layout]], run_dir,
                                            spares=0).check()
        return self.cache[layout]


class Agents:
    """Several ncl-launch agents on this machine, each behaving as one node."""

    def __init__(self, nnodes: int, nproc: int, overrides: list[str], run_dir: Path,
                 spares: int = 0) -> None:
        import secrets

        self.nnodes, self.nproc, self.run_dir = nnodes, nproc, run_dir
        self.peers = ",".join(f"127.0.0.1:{free_port()}" for _ in range(nnodes))
        self.overrides = [*overrides, f"hydra.run.dir={run_dir}"]
        self.spares = spares
        self.env = _env()
        self.env.update(NCL_JOB_ID="test-" + secrets.token_hex(3),
                        NCL_JOB_SECRET=secrets.token_hex(16))
        self.procs: dict[Any, subprocess.Popen] = {}
        self.logs: list[Path] = []
        run_dir.parent.mkdir(parents=True, exist_ok=True)

    def start(self, node: int, host: Optional[str] = None) -> subprocess.Popen:
        """Start node ``node``'s agent; ``host``: as a replacement on another host (another
        loopback address) and port, named in its own peer list only."""
        log = self.run_dir.parent / f"agent{node}-{len(self.logs)}.log"
        self.logs.append(log)
        peers = self.peers
        if host is not None:
            moved = self.peers.split(",")
            moved[node] = f"{host}:{free_port()}"
            peers = ",".join(moved)
        cmd = [sys.executable, "-m", "nemo_checkpointless.launch.agent",
               "--nnodes", str(self.nnodes), "--nproc-per-node", str(self.nproc),
               "--node-rank", str(node), "--peers", peers, "--spares", str(self.spares),
               str(PRETRAIN), *self.overrides]
        proc = subprocess.Popen(cmd, cwd=self.run_dir.parent, env=self.env,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[node] = proc
        return proc

    def start_standby(self) -> subprocess.Popen:
        """A warm standby node: takes over whichever node is lost first."""
        log = self.run_dir.parent / f"standby-{len(self.logs)}.log"
        self.logs.append(log)
        cmd = [sys.executable, "-m", "nemo_checkpointless.launch.agent", "--standby",
               "--nnodes", str(self.nnodes), "--nproc-per-node", str(self.nproc),
               "--peers", self.peers, "--standby-host", "127.0.0.3", "--spares", "0",
               str(PRETRAIN), *self.overrides]
        proc = subprocess.Popen(cmd, cwd=self.run_dir.parent, env=self.env,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[f"standby-{len(self.logs)}"] = proc
        return proc

    def kill_node(self, node: int) -> None:
        from nemo_checkpointless.launch.agent import kill_node

        kill_node(self.procs[node].pid)
        self.procs[node].wait()

    def wait(self, timeout: float = 300) -> RunResult:
        import time

        deadline = time.monotonic() + timeout
        codes = []
        try:
            for proc in self.procs.values():
                codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        finally:
            for proc in self.procs.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, 9)
        output = "\n".join(p.read_text() for p in self.logs if p.exists())
        return RunResult(max(codes) if codes else 1, output, self.run_dir)

    def wait_for_step(self, step: int, timeout: float = 120) -> None:
        import time

        deadline = time.monotonic() + timeout
        path = self.run_dir / "metrics.jsonl"
        while time.monotonic() < deadline:
            if path.exists() and len(path.read_text().splitlines()) >= step:
                return
            time.sleep(0.05)
        raise TimeoutError(f"step {step} not reached")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
