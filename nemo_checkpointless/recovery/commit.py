"""The commit protocol around the optimizer update (see docs/architecture.md).

A step mutates state in one place: the optimizer update. Just before it, every rank joins
one tiny all-reduce over the world (the *commit barrier*). A collective completes on any
rank only after every rank entered it, so if any rank passed the barrier of step N, every
rank had its final reduced gradients for N: ranks that did not apply N roll forward
locally; if no rank passed it, every rank redoes N from the same data and RNG.

"Passed" means the host saw the barrier complete: on NCCL a returning ``all_reduce`` has
only enqueued a kernel, so the barrier's result is read back (``.item()`` waits for the
kernel) and must equal the world size before the step counts as passed and its update is
applied. A barrier that did not complete raises :class:`BarrierFailed`.

The barrier also carries a *stop* flag: a rank whose agent asked the job to stop (SIGTERM,
a time limit) sets it, and since every rank sees the sum, every rank learns at the same
step that the job stops after it (``stop_after``), without a collective of its own.

This hook also keeps the RNG snapshot that starts each step, so a redone step draws the
same numbers and a replacement receives the stream its replica peers will use.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .. import device
from ..megatron.shards import capture_rng, restore_rng
from ..steps import Phase
from .failures import CommunicationFailure


class BarrierFailed(CommunicationFailure):
    """The commit barrier returned without every rank's contribution."""


class CommitProtocol:
    """Step hook: commit barrier at ``optimizer``, RNG snapshots at step boundaries.

    Its state (:meth:`state_dict`) is the last step this rank applied and the RNG that
    starts the next one. ``stop_requested()``: this rank was asked to stop the job.
    """

    def __init__(self, stop_requested: Callable[[], bool] = lambda: False) -> None:
        self.entered_step = 0
        self.passed_step = 0
        self.applied_step = 0
        self.rng_at: dict[int, Any] = {}
        self.stop_requested = stop_requested
        self.stop_after: Optional[int] = None  # the step after which every rank stops

    def on_phase(self, phase: Phase, step: int) -> None:
        if phase is Phase.DATA:
            if step not in self.rng_at:
                self.rng_at[step] = capture_rng()
            for old in [s for s in self.rng_at if s < step - 1]:
                del self.rng_at[old]
        elif phase is Phase.OPTIMIZER:
            self.entered_step = step
            if self._barrier(step, self.stop_requested()):
                self.stop_after = step
            self.passed_step = step
        elif phase is Phase.PARAM_SYNC:
            # committed: the RNG now is the RNG that starts the next step
            self.applied_step = step
            self.rng_at[step + 1] = capture_rng()

    @staticmethod
    def _barrier(step: int, stop: bool) -> bool:
        """The commit barrier; True if any rank asks the job to stop after this step."""
        flags = device.control_tensor([1, int(stop)], torch.int32)
        dist.all_reduce(flags)
        arrived, stops = (int(v) for v in flags.tolist())  # the host waits for the result
        expected = dist.get_world_size()
        if arrived != expected:
            raise BarrierFailed(f"commit barrier of step {step}: {arrived} of {expected} ranks "
                                "arrived (the collective was aborted)")
        return stops > 0

    def start_at(self, step: int) -> None:
        """A driver begins (or resumes) after ``step``: the RNG now starts ``step + 1``."""
        self.applied_step = self.entered_step = self.passed_step = step
        self.rng_at[step + 1] = capture_rng()

    def rolled_forward(self, step: int) -> None:
        """Record a local roll-forward of ``step`` (its grads were final)."""
        self.passed_step = max(self.passed_step, step)
        self.applied_step = step
        self.rng_at[step + 1] = capture_rng()

    def restore_rng(self) -> None:
        """Set every random stream to what starts the step after the applied one."""
        restore_rng(self.rng_at[self.applied_step + 1])

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.applied_step, "rng": self.rng_at[self.applied_step + 1]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        step = int(state["step"])
        self.applied_step = self.entered_step = self.passed_step = step
        self.rng_at = {step + 1: state["rng"]}
