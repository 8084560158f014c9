"""Progress-based hang detection through ncl-launch and the real job (launch/progress.py).

In one run (each behaviour costs a run of its own otherwise):

* a rank that holds the GIL in set-up for longer than the heartbeat limit (its heartbeat
  thread cannot run) is not killed: set-up is judged by the initial timeout;
* a rank blocked with the GIL released (its heartbeat goes on, no step comes) is found by
  progress; every rank's communicators are aborted, the blocked rank does not unwind, and
  it is killed and replaced. (A SIGSTOPped rank, killed at the steady timeout, is in
  test_recovery.py: kind=hang.)

The run ends bit for bit equal to the fault-free run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import RunResult, ncl_launch
from test_recovery import BASE, LAYOUTS, assert_exact, events, reference  # noqa: F401

pytestmark = [pytest.mark.timeout(600)]

SCRIPT = Path(__file__).resolve().parent / "scripts" / "pretrain_with_stall.py"


def launch(overrides: list[str], run_dir: Path, env: dict[str, str], spares: int = 1,
           timeout: float = 400) -> RunResult:
    """One agent, 4 ranks, running ``SCRIPT`` (recipes/pretrain.py with a misbehaviour)."""
    return ncl_launch(4, overrides, run_dir, spares=spares, timeout=timeout, env=env,
                      script=SCRIPT)


def test_gil_held_in_setup_is_not_a_hang_and_a_blocked_rank_is(tmp_path, reference):
    """One run: rank 1 holds the GIL for 10 s in set-up (longer than the 8 s the heartbeat
    rule would allow) and is not killed; rank 2 blocks before step 4 with the GIL
    released, is found by progress, does not unwind and is killed and replaced."""
    result = launch([*BASE, *LAYOUTS["dp4"]], tmp_path / "run",
                    env={"NCL_HANG_TIMEOUT_S": "8", "NCL_UNWIND_TIMEOUT_S": "20",
                         "NCL_TEST_GIL_RANK": "1", "NCL_TEST_GIL_S": "10",
                         "NCL_TEST_BLOCK_RANK": "2", "NCL_TEST_BLOCK_STEP": "4"})
    assert_exact(result, reference("dp4"))
    out = result.output
    # set-up: the hold really silenced rank 1's heartbeat thread, and nothing was killed
    assert "[test] rank 1 released the GIL after 10." in out, out[-3000:]
    gaps = [float(g) for g in re.findall(r"rank 1: heartbeat back after (\d+\.\d)s of silence",
                                         out)]
    assert gaps and max(gaps) >= 9.0, out[-3000:]
    # step 4: rank 2 waits with a live heartbeat; everyone aborts; only rank 2 stays stuck
    assert "[test] rank 2 blocks before step 4 with the GIL released" in out
    # (which ranks are found waiting first depends on when each reported step 3: under
    # load rank 2 need not be among them; every rank must unwind either way)
    assert re.search(r"rank \d: no progress for [\d.]+s waiting for a step after step 3 "
                     r"\(limit [\d.]+s\) while its heartbeat is alive", out), out[-4000:]
    assert re.search(r"ranks \[[0-3, ]+\] stalled: moved the job to generation 1", out)
    assert re.search(r"rank 2: did not unwind within 20s after its communicators were "
                     r"aborted .*: killing it", out), out[-4000:]
    killed = re.findall(r"rank (\d): .*: killing it", out)
    assert killed == ["2"], killed  # rank 1 (GIL) and the ranks that waited for rank 2 live
    assert "takes rank 2 at generation 2" in out
    assert len(result.summary["recoveries"]) == 1
    assert not [e for e in events(result) if e["event"] == "fault"]
