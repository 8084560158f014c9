"""Rebuild megatron's parallel state in place and rebind every cached group handle.

Healthy ranks keep their model, DDP buffers and optimizer across a recovery. Those objects
cache ``ProcessGroup`` handles (``tp_group``, ``pg_collection``, bucket groups'
``intra_distributed_optimizer_instance_group``, the optimizer's ``data_parallel_group``...).
After the world is re-formed and ``initialize_model_parallel`` is re-run with the same
arguments, every old handle is replaced by the new group of the same *role*, where a role
is the name of the ``parallel_state`` global that held it (or ``WORLD``).

:func:`stale_group_references` walks the same object graph and lists any handle that is
not a live group: the test that proves no object still references a destroyed group.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from ..compat import c10d

ProcessGroup = dist.ProcessGroup

_SKIP_TYPES = (torch.Tensor, str, bytes, int, float, bool, type(None), torch.dtype,
               torch.device)


def _named_groups() -> Iterator[tuple[str, ProcessGroup]]:
    """(role, group) for every group megatron's parallel_state holds, plus the world."""
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        yield "WORLD", c10d.default_group()
    for name, value in sorted(vars(ps).items()):
        if not name.startswith("_"):
            continue
        if isinstance(value, ProcessGroup):
            yield name, value
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, ProcessGroup):
                    yield f"{name}[{i}]", item
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, ProcessGroup):
                    yield f"{name}[{key!r}]", item


def group_roles() -> dict[int, str]:
    """id(group) -> role, for the groups that exist now (first role wins when shared)."""
    roles: dict[int, str] = {}
    for role, group in _named_groups():
        roles.setdefault(id(group), role)
    return roles


def groups_by_role() -> dict[str, ProcessGroup]:
    return {role: group for role, group in _named_groups()}


def _key(key: Any) -> str:
    """A dict key in a path. Never ``repr`` of a tensor: optimizer state and DDP maps are
    keyed by parameters, and formatting their values made a walk take 0.8 s (bench_gpt)."""
    if isinstance(key, (str, int, float, bool, type(None))):
        return repr(key)
    return f"<{type(key).__name__} {id(key):#x}>"


def _children(obj: Any) -> Iterator[tuple[str, Any, Callable[[Any], None]]]:
    """(path, child, setter) for the attributes and items of ``obj`` worth visiting."""
    if isinstance(obj, dict):
        for key, value in list(obj.items()):
            yield f"[{_key(key)}]", value, lambda v, k=key: obj.__setitem__(k, v)
    elif isinstance(obj, list):
        for i, value in enumerate(list(obj)):
            yield f"[{i}]", value, lambda v, i=i: obj.__setitem__(i, v)
    elif isinstance(obj, (set, frozenset, tuple)):
        for i, value in enumerate(obj):
            yield f"<{i}>", value, None  # rebuilt by the parent (immutable or hashed)
    else:
        attrs = getattr(obj, "__dict__", None)
        if attrs is not None:
            for key, value in list(attrs.items()):
                yield f".{key}", value, lambda v, k=key: object.__setattr__(obj, k, v)
        for slot in getattr(type(obj), "__slots__", ()) or ():
            if hasattr(obj, slot):
                value = getattr(obj, slot)
                yield f".{slot}", value, lambda v, s=slot: setattr(obj, s, v)


def _interesting(obj: Any) -> bool:
    if isinstance(obj, _SKIP_TYPES + (types.ModuleType, type)):
        return False
    if callable(obj) and not hasattr(obj, "__dict__"):
        return False
    module = type(obj).__module__
    if not isinstance(module, str):
        return False
    if isinstance(obj, (dict, list, tuple, set, frozenset)):
        return True
    return module.startswith(("megatron", "torch", "nemo_checkpointless", "builtins",
                              "functools", "collections"))


def _walk(roots: Iterable[Any], visit: Callable[[str, Any, Callable | None, Any], Any]) -> None:
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [(f"root{i}", r) for i, r in enumerate(roots)]
    while stack:
        path, obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for sub, child, setter in _children(obj):
            if isinstance(child, ProcessGroup):
                visit(path + sub, child, setter, obj)
            elif isinstance(child, (tuple, frozenset, set)) and any(
                    isinstance(x, ProcessGroup) for x in child):
                visit(path + sub, child, setter, obj)
            elif _interesting(child) and not isinstance(child, torch.nn.Parameter):
                stack.append((path + sub, child))


def rebind(roots: Iterable[Any], old_roles: dict[int, str]) -> int:
    """Replace every old group handle reachable from ``roots`` by the new group of its role.

    Returns the number of references replaced. Raises if a handle has no known role.
    """
    new = groups_by_role()
    new_ids = {id(g) for g in new.values()} | live_groups()
    replaced = 0

    def swap(group: ProcessGroup) -> ProcessGroup:
        if id(group) in new_ids:
            return group
        role = old_roles.get(id(group))
        if role is None:
            raise RuntimeError(f"a cached process group has no known role: {group!r}")
        if role not in new:
            raise RuntimeError(f"the rebuilt parallel state has no group for role {role}")
        return new[role]

    def visit(path: str, value: Any, setter: Callable | None, parent: Any) -> None:
        nonlocal replaced
        if isinstance(value, ProcessGroup):
            fresh = swap(value)
            if fresh is not value:
                if setter is None:
                    raise RuntimeError(f"cannot rebind immutable reference at {path}")
                setter(fresh)
                replaced += 1
            return
        # a tuple/set holding groups: rebuild it and set it on the parent
        rebuilt = type(value)(swap(x) if isinstance(x, ProcessGroup) else x for x in value)
        if setter is None:
            raise RuntimeError(f"cannot rebind nested immutable groups at {path}")
        setter(rebuilt)
        replaced += 1

    _walk(roots, visit)
    return replaced


def live_groups() -> set[int]:
    """ids of the process groups torch.distributed knows now."""
    if not dist.is_initialized():
        return set()
    return c10d.group_ids()


def stale_group_references(roots: Iterable[Any]) -> list[str]:
    """Paths of every group handle reachable from ``roots`` that is not a live group."""
    live = live_groups()
    stale: list[str] = []

    def visit(path: str, value: Any, setter: Callable | None, parent: Any) -> None:
        groups = [value] if isinstance(value, ProcessGroup) else [
            x for x in value if isinstance(x, ProcessGroup)]
        if any(id(g) not in live for g in groups):
            stale.append(path)

    _walk(roots, visit)
    return stale


def stale_parallel_state_groups() -> list[str]:
    """Roles in megatron's parallel_state whose group is not a live group."""
    live = live_groups()
    return [role for role, group in _named_groups() if id(group) not in live]


def refresh_cached_ranks(chunks: Iterable[Any]) -> int:
    """Re-read the ranks megatron's DDP caches next to a group handle.

    megatron-core 0.16's bucket groups keep ``intra_distributed_optimizer_instance_rank``
    (``param_and_grad_buffer.py``) beside the group it came from. A rebound group of the
    same role gives the same rank on a healthy rank, but not on chunks built in another
    world (a warm spare's, built before it had a rank). Returns the values refreshed.
    """
    count = 0
    for chunk in chunks:
        for bucket_group in [*getattr(chunk, "bucket_groups", []),
                             *getattr(chunk, "expert_parallel_bucket_groups", [])]:
            group = getattr(bucket_group, "intra_distributed_optimizer_instance_group", None)
            if group is not None:
                bucket_group.intra_distributed_optimizer_instance_rank = group.rank()
                count += 1
    return count


def current_roles() -> dict[int, str]:
    """:func:`group_roles` of megatron's parallel state, or nothing before it is set up."""
    from megatron.core import parallel_state

    return group_roles() if parallel_state.model_parallel_is_initialized() else {}
