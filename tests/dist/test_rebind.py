"""Healthy ranks rebuild megatron's groups in place: no object keeps a destroyed group."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import _env, free_port

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]

WORKER = Path(__file__).with_name("rebind_worker.py")


@pytest.mark.parametrize("layout", [
    ["strategy.tensor_model_parallel_size=2", "strategy.num_distributed_optimizer_instances=2"],
    ["strategy.pipeline_model_parallel_size=2"],
])
def test_rebind_leaves_no_reference_to_a_destroyed_group(layout, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(WORKER), str(tmp_path / "run"), "trainer.max_steps=4", *layout]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines()
               if line.startswith("RESULT ")]
    assert len(results) == 4
    for r in results:
        assert r["replaced"] > 10, r          # modules, DDP buffers, bucket groups, optimizer
        assert r["stale"] == [], r["stale"]    # nothing points at a destroyed group
        assert r["old_alive"] == 0, r          # and the old groups are garbage
        assert r["loss"] > 0                   # training goes on with the rebound objects
