"""torch.distributed's module-level collectives, routed through one handler (torch 2.x).

Lightning's and NeMo's callbacks call ``torch.distributed.barrier()``,
``broadcast_object_list`` and friends directly (NeMo's ModelCheckpoint marks an
unfinished checkpoint with a barrier on each side of the save). Inside a NeMo job under
checkpointless recovery each such call is a point the job can recover at: the handler
installed here decides, per call, whether to run it, retry it after a recovery, or (on
a replacement catching up with its peers) skip it.

:func:`install` replaces the module attributes once per process; code that resolves
``torch.distributed.<name>`` at call time (Lightning, NeMo, megatron) goes through the
handler, which calls the original. :func:`inputs` / :func:`restore_inputs` keep the
tensors an in-place collective overwrites, so a retried call starts from the same data;
:func:`regroup` maps a group handle of the aborted world to the group of the same role
in the new one.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

# collectives every participant enters; results, if any, land in arguments or returns
NAMES = ("barrier", "broadcast", "all_reduce", "reduce", "all_gather", "all_gather_into_tensor",
         "reduce_scatter_tensor", "gather", "scatter", "broadcast_object_list",
         "all_gather_object", "gather_object", "scatter_object_list", "send", "recv",
         "monitored_barrier")
# those whose only effect is that everyone arrived
RESULTLESS = ("barrier", "monitored_barrier")

Handler = Callable[[str, Callable[..., Any], tuple, dict], Any]
_original: dict[str, Callable[..., Any]] = {}


def install(handler: Handler) -> None:
    """Route every name in :data:`NAMES` through ``handler(name, original, args, kwargs)``."""
    for name in NAMES:
        original = _original.get(name) or getattr(dist, name, None)
        if original is None:
            continue
        _original[name] = original

        def routed(*args: Any, __name: str = name, __fn: Any = original, **kwargs: Any) -> Any:
            return handler(__name, __fn, args, kwargs)

        routed.__name__ = name
        routed.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(dist, name, routed)


def original(name: str) -> Callable[..., Any]:
    """The collective as torch defines it (for the package's own calls)."""
    return _original.get(name) or getattr(dist, name)


def inputs(args: tuple, kwargs: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, copy) for every tensor argument a collective may overwrite in place."""
    kept = []
    for value in (*args, *kwargs.values()):
        for tensor in _tensors(value):
            kept.append((tensor, tensor.detach().clone()))
    return kept


def restore_inputs(kept: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for tensor, copy in kept:
            tensor.copy_(copy)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value if isinstance(v, torch.Tensor) for t in [v]]
    return []


def replacements(roles: dict[int, str], groups: dict[str, Any]) -> dict[int, Any]:
    """id of each group handle of an aborted world (no longer live, known by ``roles``:
    id -> role) -> the new world's group of the same role (None for the world: the default
    group). Objects that cached a handle before a recovery (NeMo's checkpoint save strategy
    keeps the groups it was made with) pass it to every later call."""
    from .c10d import group_ids

    live = group_ids()
    return {gid: (None if role == "WORLD" else groups[role])
            for gid, role in roles.items() if gid not in live and role in groups}


def regroup(args: tuple, kwargs: dict, swap: dict[int, Any]) -> tuple[tuple, dict]:
    """``args``/``kwargs`` with the group handles ``swap`` names replaced."""
    def one(value: Any) -> Any:
        if isinstance(value, dist.ProcessGroup) and id(value) in swap:
            return swap[id(value)]
        return value

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def local_result(name: str, args: tuple, kwargs: dict) -> Optional[Any]:
    """What a skipped collective leaves behind on this rank: its own inputs (a broadcast
    keeps the local object, an all-gather of objects repeats the local one)."""
    if name == "all_gather_object" and len(args) >= 2:
        out, obj = args[0], args[1]
        for i in range(len(out)):
            out[i] = obj
    if name == "all_gather" and len(args) >= 2:
        for t in args[0]:
            t.copy_(args[1])
    return None
