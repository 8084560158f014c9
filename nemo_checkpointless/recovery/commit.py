"""The commit protocol around the optimizer update (see docs/architecture.md).

A step mutates state in one place: the optimizer update. Just before it, every rank joins
one tiny all-reduce over the world (the *commit barrier*). A collective completes on any
rank only after every rank entered it, so if any rank passed the barrier of step N, every
rank had its final reduced gradients for N: ranks that did not apply N roll forward
locally; if no rank passed it, every rank redoes N from the same data and RNG.

This hook also keeps the RNG snapshot that starts each step, so a redone step draws the
same numbers and a replacement receives the stream its replica peers will use.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..megatron.shards import capture_rng
from ..train.hooks import Phase


class CommitProtocol:
    """Step hook: commit barrier at ``optimizer``, RNG snapshots at step boundaries."""

    def __init__(self) -> None:
        self.entered_step = 0
        self.passed_step = 0
        self.rng_at: dict[int, Any] = {}

    def on_phase(self, phase: Phase, step: int) -> None:
        if phase is Phase.DATA:
            if step not in self.rng_at:
                self.rng_at[step] = capture_rng()
            for old in [s for s in self.rng_at if s < step - 1]:
                del self.rng_at[old]
        elif phase is Phase.OPTIMIZER:
            self.entered_step = step
            dist.all_reduce(torch.ones(1, dtype=torch.int32))
            self.passed_step = step
        elif phase is Phase.PARAM_SYNC:
            # committed: the RNG now is the RNG that starts the next step
            self.rng_at[step + 1] = capture_rng()

    def rolled_forward(self, step: int) -> None:
        """Record a local roll-forward of ``step`` (its grads were final)."""
        self.passed_step = max(self.passed_step, step)
        self.rng_at[step + 1] = capture_rng()
