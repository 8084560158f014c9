"""Reconciliation without an agent: two gloo ranks, one of which loses its state.

The recovery core's reconcile phase (agree, plan, transfer, adopt) runs here on its own:
no ncl-launch, no generation change, no rebuilt groups. Rank 1's optimizer shard, model,
counters and RNG are scrambled after step 3; after reconciling from rank 0 the job must
continue exactly as an uninterrupted run does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_checkpointless.comm.world import free_port

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]

WORKER = Path(__file__).with_name("reconcile_worker.py")
LAYOUT = ["strategy.num_distributed_optimizer_instances=2", "data.global_batch_size=4"]


def run(tmp_path: Path, name: str, steps: int, lose_at: int) -> dict:
    run_dir = tmp_path / name
    run_dir.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER),
           str(run_dir), str(steps), str(lose_at), *LAYOUT]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    line = next(l for l in out.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_a_rank_that_lost_its_state_is_rebuilt_from_its_replica_exactly(tmp_path):
    plain = run(tmp_path, "plain", steps=5, lose_at=0)
    lost = run(tmp_path, "lost", steps=5, lose_at=3)
    assert lost["reconcile"]["replacements"] == [1]
    assert lost["reconcile"]["committed_step"] == 3
    assert lost["reconcile"]["bytes"] > 0
    assert lost["step"] == plain["step"] == 5
    assert lost["consumed"] == plain["consumed"]
    assert lost["losses"] == plain["losses"]
    assert lost["state_sha256"] == plain["state_sha256"]
