"""Progress-based hang detection through ncl-launch and the real job (launch/progress.py).

* A rank that holds the GIL in set-up for longer than the old heartbeat limit (its
  heartbeat thread cannot run) is not killed: set-up is judged by the initial timeout.
* A rank blocked with the GIL released (its heartbeat goes on, no step comes) is found by
  progress; every rank's communicators are aborted, the blocked rank does not unwind, and
  it is killed and replaced. (A SIGSTOPped rank, killed at the steady timeout, is in
  test_recovery.py: kind=hang.)

Each run ends bit for bit equal to the fault-free run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RunResult, _env, free_port
from test_recovery import BASE, LAYOUTS, assert_exact, events, reference  # noqa: F401

pytestmark = [pytest.mark.timeout(600)]

SCRIPT = Path(__file__).resolve().parent / "scripts" / "pretrain_with_stall.py"


def launch(overrides: list[str], run_dir: Path, env: dict[str, str], spares: int = 1,
           timeout: float = 400) -> RunResult:
    """One agent, 4 ranks, running ``SCRIPT`` (recipes/pretrain.py with a misbehaviour)."""
    cmd = [sys.executable, "-m", "nemo_checkpointless.launch.agent", "--nproc-per-node", "4",
           "--spares", str(spares), "--master-port", str(free_port()), str(SCRIPT),
           *overrides, f"hydra.run.dir={run_dir}"]
    full_env = _env()
    full_env.update(env)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}-agent.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=run_dir.parent, env=full_env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code = -9
    return RunResult(code, log.read_text(), run_dir)


def test_gil_held_in_setup_is_not_a_hang(tmp_path, reference):
    result = launch([*BASE, *LAYOUTS["dp4"]], tmp_path / "run",
                    env={"NCL_TEST_GIL_RANK": "1", "NCL_TEST_GIL_S": "6",
                         "NCL_HANG_TIMEOUT_S": "3"})  # the old heartbeat limit: 3 s
    assert_exact(result, reference("dp4"))
    assert "[test] rank 1 released the GIL after 6." in result.output, result.output[-3000:]
    # the agent saw the heartbeat stop for about as long: the hold really blocked the thread
    gaps = [float(g) for g in re.findall(r"rank 1: heartbeat back after (\d+\.\d)s of silence",
                                         result.output)]
    assert gaps and max(gaps) >= 5.0, result.output[-3000:]
    assert "killing it" not in result.output and "replacing it" not in result.output
    assert result.summary["recoveries"] == []


def test_rank_blocked_with_live_heartbeat_is_found_by_progress(tmp_path, reference):
    result = launch([*BASE, *LAYOUTS["dp4"]], tmp_path / "run",
                    env={"NCL_TEST_BLOCK_RANK": "2", "NCL_TEST_BLOCK_STEP": "4",
                         "NCL_UNWIND_TIMEOUT_S": "20"})
    assert_exact(result, reference("dp4"))
    out = result.output
    assert "[test] rank 2 blocks before step 4 with the GIL released" in out
    assert re.search(r"rank 2: no progress for [\d.]+s waiting for a step after step 3 "
                     r"\(limit [\d.]+s\) while its heartbeat is alive", out), out[-4000:]
    assert re.search(r"ranks \[[0-3, ]*2[0-3, ]*\] stalled: moved the job to generation 1", out)
    assert re.search(r"rank 2: did not unwind within 20s after its communicators were "
                     r"aborted .*: killing it", out), out[-4000:]
    killed = re.findall(r"rank (\d): .*: killing it", out)
    assert killed == ["2"], killed  # the ranks that waited for it unwound and live on
    assert "takes rank 2 at generation 2" in out
    assert [e["event"] for e in events(result)].count("fault") == 0
