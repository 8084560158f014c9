"""Whole-node loss in seconds: agents watch each other's store servers.

Every agent serves a shard of the job store, so a node whose server stops answering is
most likely gone (its agent, and with it its ranks). :class:`ServerWatch` keeps, per
server, since when it has been unreachable; :class:`PeerWatch` is the thread every
training agent runs: five times a second it probes every other agent's server (one PEEK
each, which also reads ``job/nodes_done``), and when one has stayed unreachable for
``Timeouts.node_lost_after_s`` it declares that node's ranks lost
(``generations.declare_lost``: one declaration per node incarnation, none for a node a
standby has taken over meanwhile). The generation moves on, healthy ranks abort and
wait for the replacement: a new agent with the same
``--node-rank`` (the scheduler's) or a standby (``standby.py``, which watches the same way
and takes the node over). Nothing waits for the scheduler to notice.

A node is watched only once its server has answered (agents start at different times),
and nothing is declared once any node has finished (servers stop at the end of the job).
A node declared lost is not declared again until its server has answered once more.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

from ..comm import wire
from .generations import declare_lost

log = logging.getLogger("ncl.agent")

PROBE_INTERVAL_S = 0.2
DONE_KEY = b"job/nodes_done"


class ServerWatch:
    """Since when each store server has been unreachable; which count as lost."""

    def __init__(self, lost_after: float, require_seen: bool = True) -> None:
        self.lost_after = lost_after
        self.require_seen = require_seen
        self.seen: set[int] = set()
        self.down_since: dict[int, float] = {}

    def update(self, replies: list[Optional[bytes]], now: float) -> list[int]:
        """Record one probe round; the servers unreachable for ``lost_after`` or longer."""
        for i, reply in enumerate(replies):
            if reply is None:
                if i in self.seen or not self.require_seen:
                    self.down_since.setdefault(i, now)
            else:
                self.seen.add(i)
                self.down_since.pop(i, None)
        return sorted(i for i, since in self.down_since.items()
                      if now - since >= self.lost_after)

    def down_for(self, i: int, now: float) -> float:
        since = self.down_since.get(i)
        return 0.0 if since is None else now - since


def probe(store: Any) -> tuple[list[Optional[bytes]], int]:
    """One PEEK at every server: their replies (None: unreachable), and the most nodes
    any of them says have finished."""
    replies = store.probe_servers(wire.blobs(DONE_KEY))
    done = max((int(wire.unblobs(r)[0] or 0) for r in replies if r is not None), default=0)
    return replies, done


class PeerWatch:
    """The thread that declares other nodes lost when their servers stay unreachable."""

    def __init__(self, store: Any, me: Callable[[], Optional[int]], nproc: int,
                 lost_after: float, owner_id: str, stopping: Callable[[], bool]) -> None:
        self.store = store
        self.me = me  # this agent's node rank (a standby has none until it takes one)
        self.nproc = nproc
        self.owner_id = owner_id
        self.stopping = stopping
        self.watch = ServerWatch(lost_after)
        self.declared: set[int] = set()
        self.declarations: list[tuple[int, int]] = []  # (node, generation), for tests
        self._thread = threading.Thread(target=self._run, name="ncl-peer-watch", daemon=True)

    def start(self) -> "PeerWatch":
        if len(self.store.endpoints) > 1:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self.stopping():
            try:
                if not self.round(time.monotonic()):
                    return
            except Exception as err:  # noqa: BLE001 - a store hiccup: look again
                log.debug("peer watch: %s", err)
            time.sleep(PROBE_INTERVAL_S)

    def round(self, now: float) -> bool:
        """One probe of every server; False once the job is finishing."""
        replies, done = probe(self.store)
        if done > 0:
            log.debug("peer watch: a node finished; no more declarations")
            return False
        for i, reply in enumerate(replies):
            if reply is not None:
                self.declared.discard(i)
        me = self.me()
        for node in self.watch.update(replies, now):
            if node == me or node in self.declared or self.stopping():
                continue
            self.declared.add(node)
            ranks = list(range(node * self.nproc, (node + 1) * self.nproc))
            down = self.watch.down_for(node, now)
            gen = declare_lost(self.store, node, ranks, self.owner_id,
                               f"its store server unreachable for {down:.1f}s",
                               unreachable=self.store.endpoints[node])
            if gen is None:
                log.info("node %d unreachable for %.1fs: already declared lost, or taken "
                         "over", node, down)
                continue
            self.declarations.append((node, gen))
            # parsed by tests/e2e/test_recovery.py
            log.warning("node %d lost: its store server unreachable for %.1fs; declared by "
                        "the peer watch of %s at generation %d (ranks %s wait for its "
                        "replacement)", node, down, self.owner_id, gen, ranks)
        return True
