"""Members-only creation of megatron's process groups (the torch/megatron compat shim).

megatron's ``initialize_model_parallel`` creates every group through
``parallel_state.create_group`` with ``use_local_synchronization=False``: every rank of the
world walks every group, and torch names groups by a world-wide counter. What each backend
needs is different:

* **gloo** groups (CPU rehearsal, and megatron's ``*_GLOO`` groups on GPUs) rendezvous
  through the store among their members only. Members-only creation is valid, but torch's
  hashed names for it (``use_local_synchronization=True``) mix in how many groups *this*
  rank already belongs to, which differs between members (e.g. only the first pipeline
  stage is in the position-embedding group), so members would look for each other under
  different store keys. We give each such group a name that every member computes alike:
  ``ncl/<desc>/<hash of ranks>/<n-th group with that desc and ranks in this world>``.
  Non-members then do nothing at all.
* **NCCL without a bound device** (the default, ``comm/world.py`` ``group_rebuild=
  "members"``): each group's communicator is created by its members only, from a unique
  id its first member publishes in the group's store keys, so members-only creation is
  used as on gloo. Cost per recovery: each rank initialises its own groups, concurrently
  with every other group; nothing grows with the world.
* **NCCL with a bound device** (``device_id`` at ``init_process_group``, ``group_rebuild=
  "split"``) splits every new communicator from the world's (``ncclCommSplit``), and a
  split is collective over the whole world: non-members must take part (NOCOLOR split).
  Those groups keep megatron's world-wide path.

Correctness condition (torch's note on ``use_local_synchronization``): the members of a
group must create their overlapping groups in the same order. megatron creates groups in
one deterministic loop order on every rank, which satisfies it.

:func:`enable_local_group_sync` patches ``parallel_state.create_group`` (once, idempotent);
call it before ``initialize_model_parallel``. :func:`disable_local_group_sync` undoes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import Counter
from typing import Any, Optional

import torch.distributed as dist

from ..compat import c10d

_lock = threading.Lock()
_original_create_group = None


class _WorldCounters:
    """Occurrence counters of (desc, ranks), reset whenever the world group changes."""

    def __init__(self) -> None:
        self.owner: Any = None  # strong ref: a later world can never reuse its id
        self.counts: Counter = Counter()

    def next_name(self, desc: Optional[str], ranks: list[int]) -> str:
        world = c10d.default_group()
        if world is not self.owner:
            self.owner, self.counts = world, Counter()
        desc = desc or "group"
        digest = hashlib.sha1(",".join(map(str, ranks)).encode()).hexdigest()[:12]
        key = (desc, digest)
        n = self.counts[key]
        self.counts[key] += 1
        return f"ncl/{desc}/{digest}/{n}"


_counters = _WorldCounters()


def supported() -> bool:
    """Whether this torch has what the shim relies on (checked, not assumed)."""
    return c10d.supports_named_local_groups()


def members_only(backend: Optional[str]) -> bool:
    """Whether a group of ``backend`` (None: the world's) may be created by its members only."""
    if not supported() or c10d.torchcomms_enabled():
        return False
    world = c10d.default_group()
    effective = str(backend or dist.get_backend(world)).lower()
    if effective == "gloo":
        return True
    if effective == "nccl":
        return c10d.bound_device(world) is None  # bound: ncclCommSplit needs every rank
    return False


def _create_group(ranks=None, timeout=None, backend=None, pg_options=None,
                  use_local_synchronization=False, group_desc=None):
    """``parallel_state.create_group`` with members-only creation where it is valid."""
    if ranks is None or not members_only(backend):
        return _original_create_group(ranks, timeout=timeout, backend=backend,
                                      pg_options=pg_options,
                                      use_local_synchronization=use_local_synchronization,
                                      group_desc=group_desc)
    ranks = sorted(ranks)
    if dist.get_rank() not in ranks:
        return None  # what new_group returns to non-members with local synchronization
    store = _sharded_store() if str(backend or dist.get_backend()).lower() == "gloo" else None
    hint = store.rendezvous_hint(len(ranks)) if store is not None else contextlib.nullcontext()
    with _lock, hint:
        name = _counters.next_name(group_desc, ranks)
        with c10d.group_named(name):
            return _original_create_group(ranks, timeout=timeout, backend=backend,
                                          pg_options=pg_options, use_local_synchronization=True,
                                          group_desc=group_desc)


def _sharded_store():
    """The world's store if it is ours (it can batch a gloo rendezvous), else None."""
    store = c10d.group_store(c10d.default_group())
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return store if hasattr(store, "rendezvous_hint") else None


def enable_local_group_sync() -> bool:
    """Patch megatron's ``create_group`` (before ``initialize_model_parallel``).

    Returns False (and changes nothing) where this torch lacks what the shim needs.
    """
    global _original_create_group
    from megatron.core import parallel_state as ps

    if not supported():
        return False
    with _lock:
        if _original_create_group is None:
            _original_create_group = ps.create_group
            ps.create_group = _create_group
    return True


def disable_local_group_sync() -> None:
    """Restore megatron's own ``create_group``."""
    global _original_create_group
    from megatron.core import parallel_state as ps

    with _lock:
        if _original_create_group is not None:
            ps.create_group = _original_create_group
            _original_create_group = None


def is_enabled() -> bool:
    return _original_create_group is not None
