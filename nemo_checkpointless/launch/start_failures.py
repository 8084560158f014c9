"""The start-failure limit: a rank whose processes keep dying before their first step stops the job.

A replacement that crashes in its start-up or its recovery (a bug on the replacement path,
a broken host library, a corrupt file only a fresh process reads) would otherwise be
replaced for ever: one generation a second, the healthy ranks re-forming each time, and
nothing in the logs but the same traceback. :class:`StartFailures` counts, per rank, the
processes in a row that died without completing a step (no ``Step`` message since the
process took the rank); at ``AgentLimits.max_start_failures`` the supervisor stops the job
with ``EXIT_UNRECOVERABLE`` and :meth:`StartFailures.message` says which rank, how each
process ended and where their output is. A completed step clears the rank's count: a rank
that fails again and again with steps in between is ordinary recovery and never limited.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Death:
    """One process of a rank that died before completing a step."""

    pid: int
    how: str  # "exit code 1", "hung: ...", "device error (...)"


class StartFailures:
    """Per rank, the processes in a row that died before their first step."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no limit
        self.deaths: dict[int, list[Death]] = {}

    def record(self, rank: int, pid: int, how: str, stepped: bool) -> bool:
        """A process of ``rank`` died (``stepped``: it completed a step since it took the
        rank, or it does not report steps). True when the limit is reached."""
        if stepped:
            self.deaths.pop(rank, None)
            return False
        deaths = self.deaths.setdefault(rank, [])
        deaths.append(Death(pid, how))
        return self.limit > 0 and len(deaths) >= self.limit

    def count(self, rank: int) -> int:
        return len(self.deaths.get(rank, []))

    def message(self, rank: int) -> str:
        """Why the job stops, for the agent's log: the rank, each process's end, the log."""
        deaths = self.deaths.get(rank, [])
        ends = "; ".join(f"pid {d.pid}: {d.how}" for d in deaths)
        return (f"rank {rank} failed {len(deaths)} times in a row before completing a step "
                f"({ends}): not starting another process for it (--max-start-failures "
                f"{self.limit}). Its output is in {agent_log()}: the lines tagged "
                f"[rank {rank}] after 'started rank {rank} (pid P)' for those pids; the last "
                "one's error is just above. A new process would fail the same way: fix the "
                "cause, then start the job again with the same run directory (it resumes "
                "from its newest durable checkpoint)")


def agent_log() -> str:
    """Where this agent's stderr (and its ranks', which inherit it) goes, when it is a file."""
    try:
        target: Optional[str] = os.readlink("/proc/self/fd/2")
    except OSError:
        target = None
    if target and target.startswith("/") and not target.startswith("/dev/"):
        return f"this agent's log ({target})"
    return "this agent's log (its stderr: the job's output file under Slurm, kubectl logs)"
