"""The GPU smoke script's own plumbing, fast, on the CPU: its transfer round trip and its
report entries. (The whole CPU dry run, ``SMOKE_CPU=1 bash scripts/gpu/smoke.sh``, takes
4 to 9 minutes on a 2-core machine: three ncl-launch runs; see docs/gpu.md.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOKE = Path(__file__).resolve().parents[2] / "scripts" / "gpu" / "smoke.py"


def load_smoke():
    spec = importlib.util.spec_from_file_location("ncl_gpu_smoke", SMOKE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transfer_round_trip_and_report_entries(tmp_path):
    smoke = load_smoke().Smoke(tmp_path, cpu=True, installed=0)
    smoke.check("transfer_round_trip", smoke.transfer_round_trip)
    smoke.check("broken", lambda: 1 / 0)
    ok, broken = smoke.checks
    assert ok["passed"], ok
    assert ok["details"]["replica_equal"] and ok["details"]["corruption_caught"]
    assert ok["details"]["messages"] > 1 and ok["details"]["runs"] > 1
    assert not broken["passed"] and broken["error"].startswith("ZeroDivisionError")
