"""Shared fixtures: run the real entry point as real processes on free ports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest

from job_processes import AgentGroup, FinishedJob, free_port, run_in_session

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "recipes" / "pretrain.py"


class RunResult(FinishedJob):
    """A finished run of the core venv: exit code, output and the files rank 0 wrote."""


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
    log = run_dir.parent / f"{run_dir.name}-agent.log"
    code, text = run_in_session(cmd, log, cwd=run_dir.parent, env=env, timeout=timeout)
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


class Agents(AgentGroup):
    """Several ncl-launch agents on this machine, each behaving as one node."""

    result = RunResult

    def __init__(self, nnodes: int, nproc: int, overrides: list[str], run_dir: Path,
                 spares: int = 0) -> None:
        import secrets

        env = _env()
        env.update(NCL_JOB_ID="test-" + secrets.token_hex(3),
                   NCL_JOB_SECRET=secrets.token_hex(16))
        super().__init__(run_dir, env, cwd=run_dir.parent, nnodes=nnodes, nproc=nproc,
                         entry=PRETRAIN, args=[*overrides, f"hydra.run.dir={run_dir}"])
        self.spares = spares

    def start(self, node: int, spares: Optional[int] = None, host: Optional[str] = None,
              peers: Optional[str] = None, options: tuple[str, ...] = ()) -> subprocess.Popen:
        return super().start(node, self.spares if spares is None else spares, host, peers,
                             options)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
