"""One benchmarked command in its own session, killed whole (agent, ranks, spares) on timeout."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

KILLED = -9  # the exit code a timed-out command reads as


def run_in_session(cmd: list[str], log: Path, *, cwd: Path, env: dict[str, str],
                   timeout: float) -> int:
    """Run ``cmd`` with its output in ``log``; its exit code, or ``KILLED`` on timeout."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            return KILLED
