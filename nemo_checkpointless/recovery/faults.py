"""Fault injection as a library API: ``fail_at(rank, step, phase, kind)``.

Kinds: ``kill`` (SIGKILL), ``exception`` (an uncaught error: the process exits non-zero),
``hang`` (SIGSTOP: the process stays but makes no progress), ``segfault`` (a real SIGSEGV).
Phases are those of :class:`~nemo_checkpointless.steps.Phase`; the plan's typed form and its
validation live in ``config.py`` (:class:`~nemo_checkpointless.config.FaultSpec`). Each planned fault
fires once per job, even when its step is redone after a recovery: the job store records
which faults fired (a process-local set is used when no store is given).

From Hydra: ``fault.plan='[{rank:3,step:7,phase:optimizer,kind:kill}]'``.
A whole node is killed from outside (the agent and its ranks): see ``launch.agent.kill_node``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from ..config import FAULT_KINDS, FAULT_PHASES, validate_fault_plan
from ..steps import Phase

log = logging.getLogger(__name__)

KINDS = FAULT_KINDS  # FAULT_PHASES: a step's phases, and ``recovery`` (during a recovery
#                     from an earlier failure whose committed step is ``step``)
__all__ = ["FAULT_PHASES", "KINDS", "Fault", "FaultInjector", "InjectedFault", "fail_at",
           "parse_plan"]


class InjectedFault(RuntimeError):
    """The error raised by a fault of kind ``exception``."""


@dataclass(frozen=True)
class Fault:
    """One planned fault (validated)."""

    rank: int
    step: int
    phase: str
    kind: str

    @classmethod
    def of(cls, item: Any) -> "Fault":
        """From a :class:`~nemo_checkpointless.config.FaultSpec` or a mapping."""
        get = item.get if hasattr(item, "get") else (lambda k: getattr(item, k))
        return cls(int(get("rank")), int(get("step")), str(get("phase")), str(get("kind")))


def parse_plan(plan: Iterable[Any], world_size: int, max_steps: int) -> list[Fault]:
    """Validate a fault plan against the job (ConfigError, a ValueError, says what is
    wrong) and return its faults."""
    items = list(plan or [])
    validate_fault_plan(items, world_size, max_steps)
    return [Fault.of(item) for item in items]


def execute(kind: str) -> None:
    """Make this process fail in the way ``kind`` names (returns only for no kind)."""
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif kind == "segfault":
        ctypes.string_at(0)
    elif kind == "exception":
        raise InjectedFault("injected fault (kind=exception)")
    else:
        raise ValueError(f"unknown fault kind {kind!r}")


class FaultInjector:
    """A step hook that fires the planned faults of this rank.

    ``claim(index) -> bool`` decides job-wide whether fault ``index`` may fire now (first
    claim wins); ``on_fire(fault)`` records it (event log, store) just before it happens.
    """

    def __init__(self, faults: list[Fault], rank: int,
                 claim: Optional[Callable[[int], bool]] = None,
                 on_fire: Optional[Callable[[Fault], None]] = None) -> None:
        self.rank = rank
        self._mine = [(i, f) for i, f in enumerate(faults) if f.rank == rank]
        self._fired: set[int] = set()
        self._claim = claim or self._local_claim
        self._on_fire = on_fire

    def _local_claim(self, index: int) -> bool:
        if index in self._fired:
            return False
        self._fired.add(index)
        return True

    def state_dict(self) -> dict[str, Any]:
        """The faults this process claimed locally (a job store claims job-wide instead)."""
        return {"fired": sorted(self._fired)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._fired = set(state["fired"])

    def set_rank(self, rank: int, faults: list[Fault]) -> None:
        self.rank = rank
        self._mine = [(i, f) for i, f in enumerate(faults) if f.rank == rank]

    def on_phase(self, phase: Phase, step: int) -> None:
        self.fire(phase.value, step)

    def fire(self, phase: str, step: int) -> None:
        """Execute the planned fault of this rank at (``phase``, ``step``), if any."""
        for index, fault in self._mine:
            if fault.step == step and fault.phase == phase and self._claim(index):
                log.warning("injecting fault %s at step %d phase %s", fault.kind, step, phase)
                if self._on_fire is not None:
                    self._on_fire(fault)
                execute(fault.kind)


def fail_at(rank: int, step: int, phase: str, kind: str) -> dict[str, Any]:
    """One plan entry, for building ``fault.plan`` programmatically."""
    fault = Fault(rank, step, phase, kind)
    parse_plan([fault.__dict__], world_size=rank + 1, max_steps=step)
    return dict(fault.__dict__)

