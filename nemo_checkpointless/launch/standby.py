"""A standby node: an agent without a node rank that takes over the first node lost.

``ncl-launch --standby`` starts ``--nproc-per-node`` warm processes (imported, waiting for
a rank) and watches every agent's store server (``peers.ServerWatch``). Its own store
server listens from the start (the port is its own before it is needed, and agents that
ask the standbys where a shard moved get a quick "not here"), empty until a takeover. When
one node's server stays unreachable for ``Timeouts.node_lost_after_s``, the standby claims
that node rank (one claim per node and generation wins), serves the node's store shard,
bumps the generation with ``taken_over_by`` in the record and hands the lost node's ranks
to its warm processes: a whole node comes back as fast as one rank, without waiting for
the scheduler. From then on it is that node's agent (``supervisor.NodeAgent``). An agent
that was only unreachable (a partition) sees the record and stops its ranks. Nodes that left
because an agent stopped the job for good (``generations.job_stop``) are not taken over: the
standby exits with the job's exit code.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING

from ..comm.store import StoreServer
from .generations import (bump_generation, claim_takeover, fault_time, job_stop, mark_lost,
                          node_owner)
from .peers import PROBE_INTERVAL_S, ServerWatch, probe

if TYPE_CHECKING:
    from .supervisor import NodeAgent

log = logging.getLogger("ncl.agent")


def listen(agent: "NodeAgent") -> StoreServer:
    """The store server a takeover will serve from, listening from the standby's start: a
    port that is taken stops it now, not when the job needs it (``--standby-port``; 0 or
    unset: one the system picks)."""
    host = advertised_host(agent)
    try:
        server = StoreServer.for_address(host, agent.args.standby_port or 0,
                                         agent.identity).start()
    except OSError as err:
        raise SystemExit(f"ncl-launch --standby: {err} (give another --standby-port)") \
            from None
    log.info("standby node: store server listening at %s:%d, empty until a takeover", host,
             server.port)
    return server


def advertised_host(agent: "NodeAgent") -> str:
    """The host the job reaches this standby's store server at (``--standby-host``)."""
    return agent.args.standby_host or socket.gethostname()


def wait_for_lost_node(agent: "NodeAgent", server: StoreServer) -> bool:
    """Wait, warm, for a node to be lost; True once ``agent`` has taken one over (its
    store shard then served by ``server``), False when the job finished without needing
    it (``server`` stopped)."""
    try:
        return watch_for_lost_node(agent, server)
    finally:
        if agent.server is not server:  # not taken over: nothing to serve
            server.stop()


def watch_for_lost_node(agent: "NodeAgent", server: StoreServer) -> bool:
    """Probe every node's server until one is lost (take it over: True) or the job ends."""
    agent.connect_store()
    agent.peers = agent.store.refresh_endpoints()
    for _ in range(agent.nproc):
        agent.spares.append(agent.spawn(None, None, replacement=True))
    log.info("standby node: %d warm processes, watching %d nodes", agent.nproc,
             len(agent.peers))
    watch = ServerWatch(agent.timeouts.node_lost_after_s, require_seen=False)
    last_done = 0
    while True:
        replies, done = probe(agent.store)
        last_done = max(last_done, done)
        if done >= agent.args.nnodes:
            log.info("standby node: the job finished")
            return False
        lost = watch.update(replies, time.monotonic())
        if lost and len(lost) == len(replies) and (len(replies) > 1 or last_done > 0):
            # every server went at once: the nodes stopped their servers at the job's end
            # (their last "done" count can be missed between two probes); a whole job of
            # several nodes lost at once is nothing a standby can take over either
            log.info("standby node: every node's store server is gone (%d of %d had "
                     "finished when last seen): the job ended", last_done, len(replies))
            return False
        stopped = job_stop(agent.quick_store) if lost else None
        if stopped is not None:  # the nodes left on purpose: nothing to take over
            log.error("standby node: the job was stopped by node %s: %s", stopped.get("node"),
                      stopped.get("reason"))
            agent.job_stopped = stopped
            return False
        for node in lost:
            if claim_takeover(agent.store, node):
                take_over(agent, node, server)
                return True
            log.info("node %d is lost; another standby claimed it", node)
        for spare in list(agent.spares):  # keep the warm processes warm
            if spare.proc.poll() is not None:
                agent.spares.remove(spare)
                agent.spares.append(agent.spawn(None, None, replacement=True))
        time.sleep(PROBE_INTERVAL_S)


def take_over(agent: "NodeAgent", node: int, server: StoreServer) -> None:
    """Become node ``node``'s agent: its store shard (served by ``server``), its ranks, a
    new generation."""
    detected = time.time()
    agent.node_rank = node
    # the lost incarnation's loss is announced by this takeover's generation alone: a
    # peer watch that finds the old server gone a moment later declares nothing more
    # (another generation would move the job on while the survivors form this one)
    old = node_owner(agent.store, node)
    if old is not None and not mark_lost(agent.store, node, old):
        log.info("node %d was declared lost already: its ranks wait for this takeover", node)
    host, port = advertised_host(agent), server.port
    agent.server = server
    agent.store.publish_endpoint(node, (host, port))
    agent.peers = agent.store.refresh_endpoints()
    agent.store.set(f"node/{node}/owner", agent.owner_id)
    ranks = agent.local_rank_ids()
    agent.gen = bump_generation(agent.store, {
        "reason": f"node {node} lost: standby took it over", "node": node,
        "ranks": ranks, "detected_at": detected,
        "fault_at": fault_time(agent.quick_store, ranks), "taken_over_by": agent.owner_id})
    log.warning("node %d lost: this standby takes it over (store shard at %s:%d, ranks "
                "%s) at generation %d", node, host, port, ranks, agent.gen)
    with agent.lock:
        now = time.monotonic()
        for local_rank, rank in enumerate(ranks):
            agent.assign(agent.spares.pop(0), rank, local_rank, node, now)
        if agent.args.spares:
            agent.refill_at = now + agent.timeouts.spare_refill_delay_s
    agent.start_watchers()
