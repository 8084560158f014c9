"""The recovery loop's entry for a front-end whose framework owns the training loop.

NeMo 2 cannot hand Lightning's fit to ``RecoveryLoop.run()``; it calls ``join``,
``attach``, ``recover``, ``step_done`` and ``finish`` from inside its own loop
(``nemo/session.py``, tested in ``make test-nemo``). ``scripts/owned_loop.py`` does the
same with the lean Trainer, so the entry is tested here without NeMo: killed ranks (rank 1
at the commit barrier, rank 0 after an update) recover exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RunResult, _env, free_port
from test_recovery import BASE, LAYOUTS, assert_exact, assert_fired, plan, reference  # noqa: F401

pytestmark = [pytest.mark.timeout(600)]

SCRIPT = Path(__file__).resolve().parent / "scripts" / "owned_loop.py"


def test_a_loop_of_its_own_recovers_exactly(tmp_path, reference):
    faults = [(1, 3, "optimizer", "kill"), (0, 6, "after_step", "kill")]
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "nemo_checkpointless.launch.agent", "--nproc-per-node", "4",
           "--spares", "1", "--master-port", str(free_port()), str(SCRIPT), *BASE,
           *LAYOUTS["dp4"], plan(*faults), f"hydra.run.dir={run_dir}"]
    log = tmp_path / "agent.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=400)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code = -9
    result = RunResult(code, log.read_text(), run_dir)
    assert_exact(result, reference("dp4"))
    assert_fired(result, faults)
    assert len(result.summary["recoveries"]) == 2
    assert all(r["bytes_transferred"] > 0 for r in result.summary["recoveries"])
