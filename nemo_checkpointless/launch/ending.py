"""How a node agent ends: an unrepairable failure, another agent's stop, a failed GPU, the finish.

Each function takes the :class:`~.supervisor.NodeAgent` (lock held where it says so) and
returns the agent's exit code (``protocol.py``). A stop with ``EXIT_UNRECOVERABLE`` is
announced in the job store (``generations.announce_job_stop``): every other agent follows
it (:func:`stopped_elsewhere`, :func:`follow_job_stop`) instead of waiting for this node's
return, and no standby takes this node over.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Optional

from . import protocol
from .generations import announce_job_stop, declare_lost, read_record
from .spawner import Child, kill_all

if TYPE_CHECKING:
    from .supervisor import NodeAgent

log = logging.getLogger("ncl.agent")


def stop_job(agent: "NodeAgent", rank: int, child: Child, code: Optional[int]) -> int:
    """Rank ``rank`` failed where nothing repairs it (it says the job cannot recover,
    recovery is off, or it failed before its start-up went through): stop the job."""
    if child.fatal is not None:
        why = f"and reports that the job cannot recover: {child.fatal}"
    elif code == protocol.EXIT_UNRECOVERABLE:
        why = "and cannot be recovered"
    elif not child.recovery:
        why = "recovery is off"
    else:
        why = "before it started training (bad config or environment?)"
    reason = f"rank {rank} failed (exit code {'none yet' if code is None else code}) {why}"
    if code is None or code <= 0:
        code = protocol.EXIT_UNRECOVERABLE if child.fatal is not None else 1
    return end_job(agent, rank, reason, code)


def end_job(agent: "NodeAgent", rank: int, reason: str, code: int) -> int:
    """Stop this node's ranks and spares for good; with ``EXIT_UNRECOVERABLE`` every other
    agent's too (announced in the store). Returns ``code``."""
    log.error("%s: stopping the job (exit code %d)", reason, code)
    agent.stopping = True
    kill_all([*agent.ranks.values(), *agent.spares])
    if code == protocol.EXIT_UNRECOVERABLE:
        try:  # the other agents stop now instead of waiting for this node's return
            announce_job_stop(agent.store, agent.node_rank, [rank], reason, code,
                              agent.owner_id)
        except Exception as err:  # noqa: BLE001 - the store may be gone too
            log.warning("could not tell the other agents that the job stops: %s", err)
    return code


def stopped_elsewhere(agent: "NodeAgent", gen: int) -> bool:
    """Generation ``gen`` announces that another agent stopped the job for good: note it
    for the supervision loop (:func:`follow_job_stop`) and stop watching."""
    record = read_record(agent.store, gen) or {}
    if not record.get("job_stopped") or record.get("stopped_by") == agent.owner_id:
        return False
    agent.job_stopped = record
    agent.stopping = True  # no more declarations of lost nodes: they leave on purpose
    return True


def follow_job_stop(agent: "NodeAgent") -> int:
    """Another agent stopped the job for good (lock held): stop this node's ranks and exit
    with that agent's code."""
    record = agent.job_stopped or {}
    code = int(record.get("exit_code") or protocol.EXIT_UNRECOVERABLE)
    log.error("the job was stopped by node %s (%s): %s; stopping this node's ranks (exit "
              "code %d)", record.get("node"), record.get("stopped_by"), record.get("reason"),
              code)
    kill_all([*agent.ranks.values(), *agent.spares])
    agent.spawner.stop_zygote()
    return code


def unhealthy_node(agent: "NodeAgent", device: int) -> int:
    """GPU ``device`` failed its health probe: no more work goes to this node. Its ranks
    stop, the node is declared lost at once (the other ranks stop waiting for it) and the
    agent exits ``EXIT_NODE_UNHEALTHY``, so that the scheduler or a standby replaces it."""
    agent.stopping = True
    kill_all([*agent.ranks.values(), *agent.spares])
    try:  # tell the job now instead of waiting for the peers to miss our server
        declare_lost(agent.store, agent.node_rank, agent.local_rank_ids(), agent.owner_id,
                     f"GPU {device} failed its health probe")
    except Exception as err:  # noqa: BLE001 - the peers' watch declares it anyway
        log.warning("could not declare this node lost: %s", err)
    agent.spawner.stop_zygote()
    return protocol.EXIT_NODE_UNHEALTHY


def stop_spares(agent: "NodeAgent") -> None:
    agent.stopping = True
    for spare in agent.spares:
        spare.proc.kill()
    for spare in agent.spares:
        spare.proc.wait()
    agent.spawner.stop_zygote()


def finish(agent: "NodeAgent") -> int:
    """Every local rank finished: wait (up to the store timeout) for the other nodes, so
    that this node's store server outlives their last reads, then clean up."""
    stop_spares(agent)
    try:
        agent.store.add("job/nodes_done", 1)
        deadline = time.monotonic() + agent.timeouts.store_s
        while agent.server is not None and time.monotonic() < deadline:
            if int(agent.store.add("job/nodes_done", 0)) >= agent.args.nnodes:
                break
            time.sleep(0.05)
    except Exception as err:  # noqa: BLE001 - the store may be gone with another node
        log.warning("could not wait for the other nodes: %s", err)
    remove_data_cache(agent.identity.job_id)
    if agent.server is not None:
        agent.server.stop()
    log.info("node %d: all ranks finished", agent.node_rank)
    return 0


def remove_data_cache(job_id: str) -> None:
    """The job's shared-memory batch cache on this node (tier 2) is no longer needed."""
    from ..data.shm_cache import remove_job_cache

    root = os.environ.get("NCL_DATA_CACHE_PATH", "/dev/shm")
    remove_job_cache(root, job_id)
