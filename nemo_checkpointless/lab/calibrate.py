"""A raw gloo send of a transfer's bytes between the same pair, right after the transfer.

The benchmarks compare the peer transfer's rate with it (``transfer efficiency``); it runs
only when asked for (``NCL_TRANSFER_CALIBRATE=1``, read by the composition root), under
the same load as the transfer it calibrates.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from .. import device


def raw_send(rank: int, shard_bytes: Callable[[], int]) -> Callable[[Any], float]:
    """An ``after_transfer(plan)`` hook for the reconciler: seconds of one raw send."""

    def measure(plan: Any) -> float:
        target, donors = min(plan.transfers.items())
        buf = torch.ones(shard_bytes(), dtype=torch.uint8, device=device.current())
        dist.barrier()
        t0 = time.perf_counter()
        if rank == donors[0]:
            dist.send(buf, target)
        elif rank == target:
            dist.recv(buf, donors[0])
        seconds = device.control_tensor([time.perf_counter() - t0], torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        return float(seconds.item())

    return measure
