"""The world process group: created from the launcher's environment (torchrun-compatible).

Timeouts are explicit: ``NCL_PG_TIMEOUT_S`` (default 600 s) bounds every collective.

How megatron's groups are built on NCCL (``group_rebuild``): ``members`` (the default,
:data:`GROUP_REBUILD_DEFAULT`) leaves the world's device unbound, so every group's
communicator is created by that group's members alone (a unique id through the store,
``ncclCommInitRank`` of the members), as gloo's groups are; ``split`` binds the device at
``init_process_group`` (``device_id``), which makes torch split every new group from the
world communicator (``ncclCommSplit``): one collective of the whole world per group,
which ``python -m nemo_checkpointless.simulate`` puts at minutes per recovery at 2,304
GPUs. docs/gpu.md argues both against torch's and NCCL's source.
"""

from __future__ import annotations

import datetime
import os

import torch.distributed as dist

from .. import cpu, device
from ..compat import c10d

GROUP_REBUILD_MODES = ("members", "split")
GROUP_REBUILD_DEFAULT = "members"  # the simulator's default follows this


def backend_for(requested: str) -> str:
    """``auto`` picks NCCL on GPUs and gloo in CPU rehearsal mode."""
    if requested != "auto":
        return requested
    return "nccl" if cpu.cuda_available() else "gloo"


def default_timeout(backend: str = "nccl") -> datetime.timedelta:
    """Bound on every collective (``timeouts.pg_s``: 600 s on NCCL and 60 s on gloo by
    default, resolved by the agent and exported to the ranks).

    On gloo the bound is short because it is also the last resort of an abort: a gloo wait
    that the shut-down connections did not wake ends here, and the rank then recovers.
    """
    from ..timeouts import Timeouts

    return Timeouts.from_env().pg(backend)


def init_world(backend: str = "auto", timeout: datetime.timedelta | None = None,
               group_rebuild: str = GROUP_REBUILD_DEFAULT) -> None:
    """Create the default process group from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT.

    On NCCL the rank's device is selected (``device.select``) before the world exists;
    ``group_rebuild`` says whether it is also bound to the world (see the module docstring).
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        _single_process_env()
    backend = backend_for(backend)
    dist.init_process_group(backend=backend, timeout=timeout or default_timeout(),
                            **device_kwargs(backend, group_rebuild))


def device_kwargs(backend: str, group_rebuild: str = GROUP_REBUILD_DEFAULT) -> dict:
    """Select the rank's device for ``backend``; on NCCL with ``group_rebuild="split"``
    also return ``device_id`` (bound: torch splits later groups from the world's)."""
    if group_rebuild not in GROUP_REBUILD_MODES:
        raise ValueError(f"group_rebuild={group_rebuild!r}: choose one of "
                         f"{', '.join(GROUP_REBUILD_MODES)}")
    chosen = device.select(backend)
    if backend != "nccl" or group_rebuild != "split":
        return {}
    return {"device_id": chosen}


def fake_world(rank: int, world_size: int) -> None:
    """A world whose collectives do nothing (torch's ``fake`` backend): objects that need
    parallel state to be built (NeMo's, a warm spare's model) are built in it, and their
    group handles are rebound to the real world's later (``megatron/rebind.py``)."""
    c10d.init_fake_world(rank, world_size)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now (the OS picks it; never a hard-coded port)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _single_process_env() -> None:
    """A plain ``python recipes/pretrain.py`` is a world of one rank."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def destroy_world() -> None:
    """Destroy megatron's groups and the world group, if any."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
