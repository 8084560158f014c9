"""Shared fixtures: run the real entry point as real processes on free ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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
    return env


def torchrun(nproc: int, overrides: list[str], run_dir: Path, timeout: float = 240) -> RunResult:
    """``torchrun --nproc-per-node N recipes/pretrain.py ...`` on a free port."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()),
        str(PRETRAIN), *overrides, f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(cmd, cwd=run_dir.parent, env=_env(), capture_output=True, text=True,
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


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
