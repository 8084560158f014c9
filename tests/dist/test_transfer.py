"""State transfer on 3 gloo ranks, both ways: gloo's tagged messages and NCCL's batches
(run here over gloo with every tag equal, which is how NCCL matches: by order alone)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import _env, free_port

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]

WORKER = Path(__file__).with_name("transfer_worker.py")


def test_both_ways_deliver_the_same_bytes_and_blob():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    rows = {r["rank"]: r for r in (json.loads(l.split("RESULT ", 1)[1])
                                   for l in proc.stdout.splitlines() if l.startswith("RESULT "))}
    assert sorted(rows) == [0, 1, 2]
    for way in ("False", "True"):
        donors = [rows[0][way], rows[1][way]]
        target = rows[2][way]
        assert all(d["same"] for d in donors) and target["same"], way
        total = sum(d["sent"] for d in donors)
        assert total == target["received"] > 0 and min(d["sent"] for d in donors) > 0, way
        assert target["blob"] == {"step": 5, "batched": way == "True", "rng": [0, 1, 2, 3]}
        assert target["from"] == [0, 1] and donors[0]["blob"] is None
