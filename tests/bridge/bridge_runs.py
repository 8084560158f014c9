"""Run recipes/bridge_pretrain.py as real processes: torchrun, ncl-launch, several agents.

The Bridge tests run in the latest lane only (``make test-latest``, .venv-latest): elsewhere
they skip (:data:`needs_bridge`)."""

from __future__ import annotations

import importlib.util
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Optional

import pytest

from job_processes import AgentGroup, FinishedJob, free_port, run_in_session

needs_bridge = pytest.mark.skipif(
    importlib.util.find_spec("megatron.bridge") is None,
    reason="Megatron-Bridge is not installed here; run `make test-latest` (.venv-latest)")

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "recipes" / "bridge_pretrain.py"


def env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    out = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", NCL_FORCE_CPU="1",
               HF_HUB_OFFLINE="1")
    # Bridge's imports take tens of seconds on 2 shared cores: a silent rank is not hung
    out.setdefault("NCL_HANG_TIMEOUT_S", "60")
    out.update(extra or {})
    return out


class Run(FinishedJob):
    """A finished Bridge run: exit code, output, and the files rank 0 wrote."""


def _run(cmd: list[str], run_dir: Path, timeout: float, extra_env: Optional[dict]) -> Run:
    log = run_dir.parent / f"{run_dir.name}.log"
    code, text = run_in_session(cmd, log, cwd=run_dir.parent, env=env(extra_env),
                                timeout=timeout)
    return Run(code, text, run_dir)


def torchrun(nproc: int, args: list[str], run_dir: Path, timeout: float = 900,
             extra_env: Optional[dict] = None) -> Run:
    """Bridge's own launch: ``torchrun recipes/bridge_pretrain.py ...``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(ENTRY),
           *args, f"hydra.run.dir={run_dir}"]
    return _run(cmd, run_dir, timeout, extra_env)


def ncl_launch(nproc: int, args: list[str], run_dir: Path, *, spares: int = 1,
               timeout: float = 900, extra_env: Optional[dict] = None) -> Run:
    """One ``ncl-launch`` agent (one node) running recipes/bridge_pretrain.py."""
    cmd = [sys.executable, "-m", "nemo_checkpointless.launch.agent", "--nproc-per-node",
           str(nproc), "--spares", str(spares), "--master-port", str(free_port()), str(ENTRY),
           *args, f"hydra.run.dir={run_dir}"]
    return _run(cmd, run_dir, timeout, extra_env)


class Agents(AgentGroup):
    """Several ncl-launch agents on this machine, each one node of the job."""

    result, step_timeout, wait_timeout = Run, 600, 900

    def __init__(self, nnodes: int, nproc: int, args: list[str], run_dir: Path) -> None:
        super().__init__(run_dir, env({"NCL_JOB_ID": "bridge-" + secrets.token_hex(3),
                                       "NCL_JOB_SECRET": secrets.token_hex(16)}),
                         cwd=run_dir.parent, nnodes=nnodes, nproc=nproc, entry=ENTRY,
                         args=[*args, f"hydra.run.dir={run_dir}"])


def plan(*faults: tuple[int, int, str, str]) -> str:
    items = ",".join(f"{{rank:{r},step:{s},phase:{p},kind:{k}}}" for r, s, p, k in faults)
    return f"fault.plan=[{items}]"


def assert_same_run(got: Run, want: Run, steps: Any = None) -> None:
    """Every row's loss_hex (and batch, samples, lr) and the state hash, bit for bit."""
    got.check()
    rows, ref = got.metrics, want.metrics
    if steps is not None:
        ref = [r for r in ref if r["step"] in steps]
    assert [r["step"] for r in rows] == [r["step"] for r in ref], "one row per committed step"
    for key in ("loss_hex", "batch_hash", "consumed_samples", "lr", "grad_norm"):
        assert [r[key] for r in rows] == [r[key] for r in ref], key
    assert got.summary["state_sha256"] == want.summary["state_sha256"]
