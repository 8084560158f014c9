"""torch.distributed's private surface (``distributed_c10d``), behind stable names.

Everything the package needs from torch's process-group registry lives here, found by
feature detection: the registry of live groups (``_world.pg_map``), forgetting all groups
without shutting them down, the bracketed NCCL abort torch's ``_abort_process_group`` uses, the
default group and its store, the hashed group names that members-only creation overrides,
and the ``fake`` backend from ``torch.testing._internal``. Read against torch 2.13's
``torch/distributed/distributed_c10d.py``; torch 2.11 (the GPU machine's) has the same
names. A missing name raises :class:`C10dUnsupported` naming it, never an AttributeError
deep in a recovery.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as _c10d


class C10dUnsupported(RuntimeError):
    """This torch lacks a private name the package relies on."""


def _need(name: str) -> Any:
    value = getattr(_c10d, name, None)
    if value is None:
        raise C10dUnsupported(
            f"torch {torch.__version__} has no torch.distributed.distributed_c10d.{name}; "
            "nemo_checkpointless supports torch 2.11 to 2.13 (pin one of them)")
    return value


# ---------------------------------------------------------------------- the registry
def default_group() -> Any:
    """The world group (``ValueError`` when none is initialised, as torch raises)."""
    return _need("_get_default_group")()


def live_groups() -> list[Any]:
    """Every process group torch knows in this process, the world included."""
    if not dist.is_initialized():
        return []
    return list(_need("_world").pg_map)


def group_ids() -> set[int]:
    """``id()`` of every live group (to tell stale cached handles from current ones)."""
    return {id(g) for g in live_groups()}


def group_store(group: Any) -> Any:
    """The store a group was created over (its PrefixStore)."""
    return _need("_world").pg_map[group][1]


def bound_device(group: Any) -> Optional[torch.device]:
    """The device bound at ``init_process_group(device_id=...)``, None when unbound."""
    return getattr(group, "bound_device_id", None)


def torchcomms_enabled() -> bool:
    """Whether torch routes groups through torchcomms (then the name override is moot)."""
    probe = getattr(_c10d, "_use_torchcomms_enabled", None)
    return bool(probe and probe())


def forget_all() -> list[Any]:
    """Drop every group from torch's registry without shutting any down; returns them.

    ``destroy_process_group`` calls ``shutdown()`` on each group, which on an aborted gloo
    group can block for seconds holding the GIL. This clears the same tables torch's own
    destroy clears (and resets the group counter, as torch does when WORLD goes), so a new
    world can be formed at once; the caller keeps the returned groups alive until their
    destructors may run.
    """
    if not dist.is_initialized():
        return []
    world = _need("_world")
    groups = list(world.pg_map)
    _need("_update_default_pg")(None)
    for name in ("pg_map", "pg_names", "pg_group_ranks", "pg_backend_config", "pg_to_tag",
                 "tags_to_pg", "pg_coalesce_state"):
        table = getattr(world, name, None)
        if table is not None:
            table.clear()
    _need("_unregister_all_process_groups")()
    world.group_count = 0
    return groups


# ---------------------------------------------------------------------- NCCL abort
def abort_all_groups() -> list[Any]:
    """Abort every group of this process inside one NCCL group call; returns the groups.

    torch's ``_abort_process_group(None)`` aborts every communicator between the NCCL
    backend's ``_group_start()`` and ``_group_end()`` (ncclGroupStart/End), newest group
    first, so that the aborts of communicators that share a stream cannot wait on one
    another (pytorch/pytorch#119797, #150690). It then also clears torch's registry, on
    the calling thread. Here the abort runs on the agent-link thread while the training
    thread still needs the registry (the world handle names the ``WORLD`` role that
    megatron/rebind.py rebinds), so the same bracket and order are applied and the
    registry is left to :func:`forget_all`, called by the training thread. Without the
    bracket methods (a torch that lacks them) the groups are aborted one by one.
    """
    groups = live_groups()
    if not groups:
        return []
    world = _need("_world")
    ordered = sorted(groups, key=lambda g: str(world.pg_names.get(g, "")), reverse=True)
    nccl = _nccl_backend(default_group())
    if nccl is not None:
        nccl._group_start()
    try:
        for group in ordered:
            try:
                group.abort()
            except RuntimeError:  # a backend without abort: nothing to wake there
                pass
    finally:
        if nccl is not None:
            nccl._group_end()
    return groups


def has_bracketed_abort() -> bool:
    """Whether the world's NCCL backend offers the ncclGroupStart/End bracket."""
    return dist.is_initialized() and _nccl_backend(default_group()) is not None


def _nccl_backend(group: Any) -> Any:
    try:
        backend = group._get_backend(torch.device("cuda"))
    except (RuntimeError, AttributeError):
        return None
    if hasattr(backend, "_group_start") and hasattr(backend, "_group_end"):
        return backend
    return None


# ---------------------------------------------------------------------- group names
@functools.lru_cache(maxsize=None)
def supports_named_local_groups() -> bool:
    """Whether groups can be created by their members only under a name we choose."""
    return (hasattr(_c10d, "_process_group_name") and hasattr(_c10d, "GroupName")
            and "use_local_synchronization" in inspect.signature(dist.new_group).parameters)


@contextlib.contextmanager
def group_named(name: str) -> Iterator[None]:
    """Within this block every new group is named ``name`` (torch's hashed names for
    members-only groups differ between members; see megatron/groups.py)."""
    original: Callable = _need("_process_group_name")
    group_name = _need("GroupName")
    _c10d._process_group_name = lambda ranks, use_hashed_name: group_name(name)
    try:
        yield
    finally:
        _c10d._process_group_name = original


# ---------------------------------------------------------------------- fake backend
def init_fake_world(rank: int, world_size: int) -> None:
    """``init_process_group`` on torch's ``fake`` backend (collectives do nothing); it
    lives in ``torch.testing._internal`` and registers itself on import."""
    try:
        import torch.testing._internal.distributed.fake_pg as fake_pg
    except ImportError as err:
        raise C10dUnsupported(f"torch {torch.__version__} has no fake process-group "
                              "backend (torch.testing._internal.distributed.fake_pg)") from err
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=rank,
                            world_size=world_size)
