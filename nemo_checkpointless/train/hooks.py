"""The phases of one training step, and the hook protocol that recovery and faults use.

The loop calls ``on_phase(phase, step)`` at the start of each phase. Recovery (commit
protocol) and fault injection attach here, so the loop itself knows nothing about either.
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol, Sequence


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
