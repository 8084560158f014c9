"""The job's key-value store, with no root: every node agent serves a share of the keys.

Interface (stable):

* :class:`JobIdentity` — job id + per-job secret; every connection proves it.
* :class:`StoreServer` — one per agent: ``start()``, ``stop()``, ``port``, ``op_counts()``.
* :func:`connect` — a ``torch.distributed.Store`` over all agents' endpoints.

Design (details in ``docs/architecture.md``, "Tier 1"):

* **Sharding.** A key lives on server ``crc32(key) % n``, so store traffic spreads over the
  agents instead of converging on one host. A lost server takes its keys with it; that is
  safe because every recovery uses a new generation prefix (``pg/<G>/...``), so no key of
  an older generation is needed again (and none is ever read: the prefix differs).
* **The generation survives.** Keys named in ``replicated`` (default ``gen``, ``gen/...``,
  ``node/...``, ``job/...``: the job's membership and coordination records) live on
  every server. Counters (``add``) are
  max-registers: reads return the maximum over the servers that answer and repair those
  behind, ``add`` increments on the first server that answers after raising it to that
  maximum. Other values are records written to every server. Losing any ``n - 1`` servers
  keeps them; ``gen`` never goes backwards. ``compare_set`` is refused on them.
* **Admission.** A server greets each connection with a nonce; the client answers with the
  job id and an HMAC of the nonces keyed by the secret; the server answers with its own
  proof. A wrong job id or secret is refused (with the reason) before any key is read or
  written, and a client never talks to a server of another job that took over a port.
  Connections are authenticated, not encrypted.
* **Reconnects.** Clients connect lazily, per thread, and reconnect when a replaced agent
  serves the same host:port again; operations on an absent server retry until the store
  timeout, then fail naming the server.
* **Counting.** Every server counts the operations it serves (``op_counts()``, also
  readable remotely with ``ShardedStore.server_op_counts()``).
"""

from __future__ import annotations

import datetime
from typing import Iterable, Sequence

from .identity import (AdmissionError, Endpoint, JobIdentity, StoreError, format_endpoints,
                       parse_endpoints)
from .store_client import ShardedStore
from .store_server import StoreServer

__all__ = ["AdmissionError", "Endpoint", "JobIdentity", "ShardedStore", "StoreError",
           "StoreServer", "connect", "format_endpoints", "parse_endpoints"]


def connect(endpoints: Sequence[Endpoint] | str, identity: JobIdentity,
            timeout: datetime.timedelta = datetime.timedelta(seconds=60),
            replicated: Iterable[str] = ("gen", "gen/", "node/", "job/"),
            lookups: Sequence[Endpoint] | str = ()) -> ShardedStore:
    """A client of the job's store: keys sharded over ``endpoints`` (same order on every
    client), ``replicated`` keys (exact names, or prefixes ending in ``/``) on all of them.
    Connects lazily; ``timeout`` bounds every wait and the wait for an unreachable server.
    ``lookups``: the addresses standbys serve a shard from once they take a node over,
    also asked where a server moved."""
    if isinstance(endpoints, str):
        endpoints = parse_endpoints(endpoints)
    if isinstance(lookups, str):
        lookups = parse_endpoints(lookups) if lookups else []
    return ShardedStore(endpoints, identity, timeout, replicated, lookups=lookups)
