"""Processes a dead rank leaves behind: adopted by the process that started the rank, ended.

A rank's own helpers (megatron's checkpoint writer starts a ``spawn``-context
``multiprocessing.Manager`` server, about 300 MB, on a framework's first async save) do not
die with a SIGKILLed rank: they are reparented and live on, holding memory and, under
Slurm, the step's output (the step ends 60 s late). The process that starts ranks (the
zygote, or the agent when it execs them) declares itself a child subreaper, so that such
orphans become its children, and ends every child it did not start whenever a rank exits.
Linux only; elsewhere nothing is adopted and nothing is ended.
"""

from __future__ import annotations

import ctypes
import os
import signal
from typing import Iterable

PR_SET_CHILD_SUBREAPER = 36


def adopt_orphans() -> bool:
    """Make this process the reaper of its descendants' orphans; whether it took."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def children(parent: int) -> list[int]:
    """The live processes whose parent is ``parent`` (from /proc; [] where there is none)."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and fields[0] not in ("Z", "X") and int(fields[1]) == parent:
            found.append(int(entry))
    return found


def end_orphans(started: Iterable[int]) -> list[int]:
    """SIGKILL every child of this process that it did not start (``started``): orphans of
    dead ranks adopted as their subreaper. Their exits are reaped like any child's."""
    keep = set(started)
    ended = []
    for pid in children(os.getpid()):
        if pid in keep:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            ended.append(pid)
        except OSError:
            pass
    return ended
