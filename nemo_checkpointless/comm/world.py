"""The world process group: created from the launcher's environment (torchrun-compatible).

Timeouts are explicit: ``NCL_PG_TIMEOUT_S`` (default 600 s) bounds every collective.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .. import cpu


def backend_for(requested: str) -> str:
    """``auto`` picks NCCL on GPUs and gloo in CPU rehearsal mode."""
    if requested != "auto":
        return requested
    return "nccl" if cpu.cuda_available() else "gloo"


def default_timeout(backend: str = "nccl") -> datetime.timedelta:
    """Bound on every collective: ``NCL_PG_TIMEOUT_S``, else 600 s on NCCL and 60 s on gloo.

    On gloo the bound is short because it is also the last resort of an abort: a gloo wait
    that the shut-down connections did not wake ends here, and the rank then recovers.
    """
    default = "60" if backend == "gloo" else "600"
    return datetime.timedelta(seconds=float(os.environ.get("NCL_PG_TIMEOUT_S", default)))


def init_world(backend: str = "auto", timeout: datetime.timedelta | None = None) -> None:
    """Create the default process group from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT.

    On GPUs the local device is bound at init (``device_id``) so that megatron's groups
    are split from the world communicator instead of each exchanging a fresh unique id.
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        _single_process_env()
    backend = backend_for(backend)
    dist.init_process_group(backend=backend, timeout=timeout or default_timeout(),
                            **device_kwargs(backend))


def device_kwargs(backend: str) -> dict:
    """``device_id`` for NCCL (binds LOCAL_RANK's GPU, which makes later groups splits)."""
    if backend != "nccl":
        return {}
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return {"device_id": torch.device("cuda", local_rank)}


def fake_world(rank: int, world_size: int) -> None:
    """A world whose collectives do nothing (torch's ``fake`` backend): objects that need
    parallel state to be built (NeMo's, a warm spare's model) are built in it, and their
    group handles are rebound to the real world's later (``megatron/rebind.py``)."""
    import torch.testing._internal.distributed.fake_pg as fake_pg  # registers "fake"

    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=rank,
                            world_size=world_size)


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
