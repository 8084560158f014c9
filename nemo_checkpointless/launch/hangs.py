"""What a node agent does about its ranks' hang verdicts: kill the stopped, abort the waiting.

The verdicts come from each rank's :class:`~.progress.ProgressWatch` (``progress.py``):
``KILL`` (no progress and no heartbeat: the process is stopped or holds the GIL; or it did
not unwind after an abort) kills the rank and replaces it like one that exited; ``STALL``
(no progress while its heartbeat lives: it waits in a collective or on the device) moves
the job to a new generation without killing anyone, so that every rank aborts its
communicators and unwinds to recovery.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Optional

from . import protocol
from .generations import bump_generation, fault_time
from .progress import Verdict

if TYPE_CHECKING:
    from .supervisor import NodeAgent

log = logging.getLogger("ncl.agent")


def judge_hangs(agent: "NodeAgent") -> Optional[int]:
    """Act on the verdicts of the node's live ranks (lock held); an exit code ends the
    agent (a killed rank that reached the start-failure limit)."""
    now = time.monotonic()
    stalled: list[tuple[int, str]] = []
    for rank, child in list(agent.ranks.items()):
        if child.finished or child.hung_up or child.proc.poll() is not None:
            continue
        verdict, why = child.watch.verdict(now)
        if verdict is Verdict.KILL:
            log.error("rank %d: %s: killing it", rank, why)
            child.proc.kill()
            child.proc.wait()
            return agent.replace(rank, child, f"hung: {why}")
        if verdict is Verdict.STALL:
            stalled.append((rank, why))
    if stalled:
        abort_stalled(agent, stalled, now)
    return None


def abort_stalled(agent: "NodeAgent", stalled: list[tuple[int, str]], now: float) -> None:
    """Ranks wait without progress while their processes live: abort every rank's
    communicators (a new generation); any rank that does not unwind is killed later."""
    ranks = [rank for rank, _ in stalled]
    for rank, why in stalled:
        log.error("rank %d: %s", rank, why)
    agent.gen = bump_generation(agent.store, {
        "reason": f"ranks {ranks} made no progress: aborting every rank's communicators",
        "node": agent.node_rank, "ranks": [], "stalled": ranks,
        "detected_at": time.time(), "fault_at": fault_time(agent.quick_store, ranks)})
    log.warning("ranks %s stalled: moved the job to generation %d (every rank aborts its "
                "communicators; a rank that has not unwound within %gs is killed)",
                ranks, agent.gen, agent.timeouts.unwind_s)
    for child in agent.ranks.values():
        child.watch.new_generation(now)
        child.channel.send(protocol.Gen(gen=agent.gen))
        # every rank's communicators are aborted, so every rank must unwind: the one
        # stuck outside any collective need not be among the first found waiting
        if not (child.finished or child.done):
            child.watch.stalled(now)
