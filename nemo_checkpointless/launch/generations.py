"""The job's generation counter and its records: who moved the job on, and why.

A generation is a replicated counter (``gen``) in the job store; ``gen/<g>`` holds the
record of the move to ``g`` (reason, node, ranks, times; ranks read it for their recovery
events). Claims keep concurrent agents from acting twice on one loss:

* ``node/<n>/claim/<g>``: one standby takes node ``n`` over in generation ``g``;
* ``node/<n>/lost/<owner>``: one agent declares node ``n`` lost, once per incarnation
  of that node (``owner``: the id of the agent that last started it), so the agents that
  all see the same server gone, one after the other, make one generation of it; a standby
  that takes the node over claims the same key first, so a peer watch that sees the server
  gone a moment later does not announce the loss a second time.

``job/stopped`` records that an agent stopped the job for good (a rank that cannot be
recovered, a rank whose processes keep failing before their first step); the generation
announcing it carries ``job_stopped``, so every other agent stops too, and a standby does
not take over a node that left on purpose.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

from ..comm.identity import parse_endpoints


def bump_generation(store: Any, record: dict[str, Any]) -> int:
    """Move the job to a new generation; the record says why (read by ranks for events)."""
    gen = int(store.add("gen", 1))
    store.set(f"gen/{gen}", json.dumps(dict(record, gen=gen)))
    return gen


def current_generation(store: Any) -> int:
    return int(store.add("gen", 0))


def read_record(store: Any, gen: int) -> Optional[dict[str, Any]]:
    try:
        return json.loads(store.get(f"gen/{gen}"))
    except Exception:  # noqa: BLE001 - a record that cannot be read names nothing
        return None


def fault_time(store: Any, ranks: list[int]) -> Optional[float]:
    """When an injected fault fired on one of ``ranks`` (for the recovery timeline). The
    keys are sharded: pass a client with a short timeout (a lost node's shard would make
    each read wait the full store timeout); a key that cannot be read names no time."""
    for rank in ranks:
        key = f"fault/at/{rank}"
        try:
            if store.check([key]):
                return float(store.get(key))
        except Exception:  # noqa: BLE001 - only a timeline detail
            pass
    return None


def node_owner(store: Any, node: int) -> Optional[str]:
    """The id of the agent that last started node ``node`` (None: never started)."""
    key = f"node/{node}/owner"
    if not store.check([key]):
        return None
    return store.get(key).decode()


def claim_takeover(store: Any, node: int) -> bool:
    """One standby wins node ``node`` for the current generation."""
    gen = current_generation(store)
    return int(store.add(f"node/{node}/claim/{gen}", 1)) == 1


def mark_lost(store: Any, node: int, owner: str) -> bool:
    """Record that incarnation ``owner`` of node ``node`` is lost; True for the first
    agent to record it (the one whose generation announces the loss)."""
    return int(store.add(f"node/{node}/lost/{owner}", 1)) == 1


def published_endpoint(store: Any, node: int) -> Optional[tuple[str, int]]:
    """Where node ``node``'s store server was last published (None: never moved)."""
    key = store.endpoint_key(node)
    try:
        if not store.check([key]):
            return None
        (endpoint,) = parse_endpoints(store.get(key).decode())
        return endpoint
    except Exception:  # noqa: BLE001 - unreadable: nothing says it moved
        return None


def declare_lost(store: Any, node: int, ranks: list[int], declared_by: str,
                 reason: str, unreachable: Optional[tuple[str, int]] = None) -> Optional[int]:
    """Declare node ``node`` lost (its ranks gone) unless another agent already declared
    this incarnation of it, or (``unreachable``: the server address found down) the node
    was replaced since; returns the new generation, or None.

    A standby that takes a node over marks the old incarnation lost before it publishes
    its own address and owner (``standby.take_over``): read in the other order here
    (owner, then address), a declaration can neither repeat the takeover's nor name the
    standby's new incarnation.
    """
    owner = node_owner(store, node)
    if owner is None:
        return None
    if unreachable is not None:
        moved = published_endpoint(store, node)
        if moved is not None and tuple(moved) != tuple(unreachable):
            return None
    if not mark_lost(store, node, owner):
        return None
    return bump_generation(store, {
        "reason": f"node {node} lost: {reason} (declared by {declared_by})",
        "node": node, "ranks": ranks, "lost_owner": owner, "declared_by": declared_by,
        "detected_at": time.time()})  # no fault_at: those keys may live on the lost shard


JOB_STOPPED_KEY = "job/stopped"


def announce_job_stop(store: Any, node: Optional[int], ranks: list[int], reason: str,
                      exit_code: int, stopped_by: str) -> int:
    """The job ends for good: recorded under ``job/stopped``, then announced by a new
    generation whose record has ``job_stopped`` (every agent waits on those)."""
    record = {"reason": reason, "node": node, "ranks": ranks, "exit_code": exit_code,
              "stopped_by": stopped_by, "detected_at": time.time()}
    store.set(JOB_STOPPED_KEY, json.dumps(record))
    return bump_generation(store, dict(record, job_stopped=True))


def job_stop(store: Any) -> Optional[dict[str, Any]]:
    """The record of an agent that stopped the job for good, or None."""
    try:
        if not store.check([JOB_STOPPED_KEY]):
            return None
        return json.loads(store.get(JOB_STOPPED_KEY))
    except Exception:  # noqa: BLE001 - unreadable: nothing says the job stopped
        return None
