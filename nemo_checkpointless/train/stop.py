"""Stopping a job without in-process recovery when its agent asks (SIGTERM, a time limit).

Under ``ncl-launch`` with recovery off, nothing else synchronises the ranks' view of a stop
request: :class:`StopOnRequest` agrees on it at each step's optimizer phase (one
one-element all-reduce), and after that step writes the final durable checkpoint and
raises :class:`~nemo_checkpointless.steps.Stopped` on every rank. (With recovery on, the
commit barrier carries the flag instead: ``recovery/commit.py``.)
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from .. import device
from ..steps import Phase, Stopped


class StopOnRequest:
    """Step hook: agree on a stop request, then checkpoint and stop after that step."""

    def __init__(self, requested: Callable[[], bool],
                 save: Optional[Callable[[], None]] = None) -> None:
        self.requested = requested
        self.save = save
        self.stop_after: Optional[int] = None

    def on_phase(self, phase: Phase, step: int) -> None:
        if phase is Phase.OPTIMIZER:
            flag = device.control_tensor([int(self.requested())], torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if int(flag.item()):
                self.stop_after = step
        elif phase is Phase.AFTER_STEP and self.stop_after == step:
            if self.save is not None:
                self.save()
            dist.barrier()
            raise Stopped(step)
