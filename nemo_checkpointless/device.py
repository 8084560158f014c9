"""Each rank's compute device, chosen once: every tensor the package creates lives on it.

On a GPU rank (NCCL) it is ``cuda:LOCAL_RANK``; in CPU rehearsal (gloo) it is the CPU.
Collectives on NCCL groups only take CUDA tensors, so control-plane tensors (the commit
barrier, rank infos, loss and batch-hash reductions, transfer sizes and checksums) are
created with :func:`control_tensor` / ``device=current()`` instead of on the host. Host-only
tensors (RNG snapshots, pickled blobs, disk buffers) are explicit: they use :data:`HOST`.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

HOST = torch.device("cpu")

_DEVICE: Optional[torch.device] = None


def select(backend: str) -> torch.device:
    """Fix this process's device for ``backend`` (``nccl``: ``cuda:LOCAL_RANK``, bound with
    ``torch.cuda.set_device``; anything else: the CPU). Called once per rank, before the
    world group is formed; calling it again with the same answer is harmless."""
    global _DEVICE
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = HOST
    _DEVICE = device
    return device


def current() -> torch.device:
    """The rank's device (the CPU until :func:`select` was called)."""
    return _DEVICE if _DEVICE is not None else HOST


def is_cuda() -> bool:
    return current().type == "cuda"


def control_tensor(values: Any, dtype: torch.dtype) -> torch.Tensor:
    """A small tensor for a collective, on the rank's device (NCCL refuses host tensors)."""
    return torch.tensor(values, dtype=dtype, device=current())


def zeros(shape: Any, dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled tensor on the rank's device."""
    return torch.zeros(shape, dtype=dtype, device=current())


def synchronize() -> None:
    """Wait for every kernel queued on the rank's device (a no-op on the CPU).

    After a collective returns on NCCL only a kernel is enqueued; the host must wait for
    it before it reasons about what happened (the commit barrier does)."""
    if is_cuda():
        torch.cuda.current_stream().synchronize()
