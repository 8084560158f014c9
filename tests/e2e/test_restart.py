"""The checkpoint-restart baseline resumes exactly, so the recovery benchmark is fair.

``checkpointless=off restart.enabled=true`` under ``torchrun --max-restarts``: every
process restarts after a SIGKILL, loads the latest checkpoint, skips the data forward and
replays the steps since it. The run must end bit for bit equal to the fault-free run, with
exactly one metrics row per step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PRETRAIN, RunResult, _env, free_port, torchrun

pytestmark = [pytest.mark.timeout(600)]

STEPS = 8
BASE = ["recipe=tiny_gpt_2opt", f"trainer.max_steps={STEPS}"]


def torchrun_restart(overrides: list[str], run_dir: Path, max_restarts: int,
                     timeout: float = 400) -> RunResult:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
           "--max-restarts", str(max_restarts), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(PRETRAIN), *overrides,
           f"hydra.run.dir={run_dir}"]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, cwd=run_dir.parent, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    return RunResult(proc.returncode, proc.stdout + proc.stderr, run_dir)


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "restart_events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_restart_resume_is_bit_for_bit(tmp_path):
    (tmp_path / "ref").mkdir()
    reference = torchrun(4, BASE, tmp_path / "ref" / "run").check()
    faults = "[{rank:1,step:5,phase:optimizer,kind:kill},{rank:3,step:8,phase:forward,kind:kill}]"
    run = torchrun_restart([*BASE, "restart.enabled=true", "restart.checkpoint_interval=3",
                            f"fault.plan={faults}"], tmp_path / "restart" / "run",
                           max_restarts=2).check()
    # one row per step, every loss equal to the fault-free run's, the same final state
    assert [m["step"] for m in run.metrics] == list(range(1, STEPS + 1))
    assert [m["loss_hex"] for m in run.metrics] == [m["loss_hex"] for m in reference.metrics]
    assert [m["batch_hash"] for m in run.metrics] == [m["batch_hash"] for m in reference.metrics]
    assert run.summary["state_sha256"] == reference.summary["state_sha256"]
    # both faults fired once, each restart resumed from the checkpoint before it
    ev = events(run.run_dir)
    assert [(e["step"], e["rank"]) for e in ev if e["event"] == "fault"] == [(5, 1), (8, 3)]
    loaded = [e["checkpoint_step"] for e in ev if e["event"] == "checkpoint_loaded"]
    assert loaded == [0, 3, 6]
    skipped = [e for e in ev if e["event"] == "data_skipped"]
    assert [e["skipped_steps"] for e in skipped] == [0, 3, 6]
    assert run.summary["restart"]["attempt"] == 2


def test_restart_requires_checkpointless_off(run_dir):
    from conftest import python_run

    r = python_run(["checkpointless=tier4", "restart.enabled=true"], run_dir, timeout=60)
    assert r.returncode == 2, r.output[-2000:]
    assert "needs checkpointless=off" in r.output


def test_fault_marker_fires_once_across_processes(tmp_path):
    from nemo_checkpointless.lab.restart import MarkerClaim, process_start_time

    assert MarkerClaim(tmp_path)(0) is True
    assert MarkerClaim(tmp_path)(0) is False  # a restarted process sees the marker
    assert MarkerClaim(tmp_path)(1) is True
    # A fresh process's start is within moments of now (this pytest process may be old).
    probe = (
        "import time; from nemo_checkpointless.lab.restart import process_start_time;"
        "print(time.time() - process_start_time())"
    )
    age = float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                               check=True).stdout)
    assert 0 <= age < 60
