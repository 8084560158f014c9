"""The contract between a front-end and recovery: step phases, step hooks, the step driver.

A front-end (the lean loop in ``train/``, NeMo 2 in ``nemo/``, Megatron-Bridge in
``bridge/``) supplies a :class:`StepDriver`; recovery (``recovery/``) drives it and attaches
to the phases of each step through :class:`HookList`. Neither side imports the other.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Callable, Optional, Protocol, Sequence

import torch


class Phase(str, Enum):
    """Where in a step something happens, in order."""

    DATA = "data"
    FORWARD = "forward"
    BACKWARD = "backward"
    GRAD_SYNC = "grad_sync"
    OPTIMIZER = "optimizer"
    PARAM_SYNC = "param_sync"
    AFTER_STEP = "after_step"


PHASES: tuple[str, ...] = tuple(p.value for p in Phase)


class Stopped(Exception):
    """The job was asked to stop and every rank did, after the same step ``step``, with a
    final durable checkpoint where checkpoints are on (the rank exits ``EXIT_STOPPED``; a
    new job resumes from the checkpoint)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped after step {step} as asked")
        self.step = step


class StepHooks(Protocol):
    """Called by the training loop at the start of every phase of every step."""

    def on_phase(self, phase: Phase, step: int) -> None: ...


class HookList:
    """Fans one phase event out to several hooks, in order."""

    def __init__(self, hooks: Sequence[StepHooks] = ()) -> None:
        self._hooks = list(hooks)

    def add(self, hook: StepHooks) -> None:
        self._hooks.append(hook)

    def __call__(self, phase: Phase, step: int) -> None:
        for hook in self._hooks:
            hook.on_phase(phase, step)


class StepDriver(Protocol):
    """What recovery drives: one rank's model, optimizer and step, from any front-end.

    ``model`` are megatron's DDP chunks and ``optimizer`` megatron's optimizer. A step is
    ``train_step`` (which stops at the commit barrier through ``hooks`` and then calls
    ``commit``); ``commit`` alone rolls a prepared step forward. ``state_dict`` /
    ``load_state_dict`` carry everything a replacement needs besides the optimizer shard
    (step counter, data position, schedule, last metrics record). Optional:
    ``writes_stop_checkpoint = True`` where the front-end's framework writes the checkpoint
    of a stop on request itself (the core then neither writes nor misses one).
    """

    hooks: HookList
    step: int
    coords: Any  # megatron.parallel.Coordinates once set up
    model: list[torch.nn.Module]
    optimizer: Any
    pending: Any  # the prepared, not yet applied update (None outside a step)
    last_record: Optional[dict[str, Any]]
    metrics: Any  # metrics.writer.JsonlWriter (rank 0 writes) or None

    def train_step(self) -> Any: ...
    def commit(self) -> Any: ...
    def finish(self) -> dict[str, Any]: ...
    def rebuild_parallel(self) -> None: ...
    def rebind_roots(self) -> list[Any]: ...
    def reset_step_marks(self) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FrontEnd(Protocol):
    """Builds a rank's :class:`StepDriver` once the world and parallel state exist.

    ``collective=False``: a replacement joining healthy ranks builds without world-wide
    collectives and without drawing initial weights (its peers send every weight).
    ``prebuilt``: called once parallel state exists; returns the model chunks a warm spare
    built ahead (:meth:`spare_model`), rebound to the real groups, or None.
    """

    def build(self, hooks: HookList, *, collective: bool,
              prebuilt: Optional[Callable[[], Optional[list[torch.nn.Module]]]]
              ) -> StepDriver: ...

    def spare_model(self) -> Optional[list[torch.nn.Module]]:
        """Model chunks a warm spare builds ahead, in the fake world it waits in (None:
        this front-end or layout cannot; the replacement then builds after assignment)."""
        ...
