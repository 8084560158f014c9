"""A killed rank's own helper process does not outlive it.

Megatron's async checkpoint writer (what NeMo's and Megatron-Bridge's saves use) starts a
``spawn``-context ``multiprocessing.Manager`` server from the rank; SIGKILL the rank and the
server used to live on (about 300 MB, and under Slurm it kept the step's output open for
60 s). Here rank 1 starts such a server, the fault plan kills rank 1, and the job must end
exact with the server gone: the zygote the rank was forked from adopts it and ends it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from conftest import ncl_launch
from test_recovery import BASE, LAYOUTS, assert_exact, assert_fired, plan, reference  # noqa: F401

pytestmark = [pytest.mark.timeout(600)]

SCRIPT = Path(__file__).resolve().parent / "scripts" / "pretrain_with_helper_process.py"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def test_a_killed_ranks_helper_process_is_ended_and_the_job_stays_exact(tmp_path, reference):
    pid_file = tmp_path / "helper.pid"
    faults = [(1, 3, "after_step", "kill")]
    result = ncl_launch(4, [*BASE, *LAYOUTS["dp4"], plan(*faults)], tmp_path / "run",
                        script=SCRIPT, env={"NCL_TEST_HELPER_RANK": "1",
                                            "NCL_TEST_HELPER_PID_FILE": str(pid_file)})
    assert_exact(result, reference("dp4"))
    assert_fired(result, faults)
    helper = int(pid_file.read_text())
    assert f"started helper process {helper}" in result.output
    deadline = time.monotonic() + 10
    while alive(helper) and time.monotonic() < deadline:
        time.sleep(0.1)
    still = alive(helper)
    if still:
        os.kill(helper, 9)  # leave nothing behind on the test machine
    assert not still, f"the killed rank's helper process {helper} outlived it"
    assert "left behind" in result.output and str(helper) in result.output
