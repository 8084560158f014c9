"""What every rank keeps of its last iterations, for a replacement to catch up with.

A replacement rank re-runs the iteration its peers are in, from Lightning's own start of
that iteration, until it reaches the recovery point; what it cannot compute alone it
takes from a peer's journal:

* ``snapshots[S]``: Lightning's loop, callbacks, LR schedulers and callback metrics at
  the start of iteration ``S`` (before its first hook);
* ``steps[S]``: the step's training-step output and everything it logged (``self.log``
  calls, in order), its grad norm, and the record of the step (``metrics.jsonl`` row);
* ``after_validation[S]``: the callbacks and callback metrics right after iteration S's
  validation (a replacement that arrives after it skips the run and takes these);
* ``rows[S]``: the rows the loggers were given during iteration S (rank 0 writes them;
  every rank keeps them so a new rank 0 can write a row its predecessor did not).

Iteration ``S`` is the one that runs step ``S`` (Lightning's ``global_step + 1``); 0 is
the start of training before the first step, and ``max_steps + 1`` its end.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

KEEP = 3  # iterations kept (a recovery point is in the current one; rows may lag by one)


def detached(value: Any) -> Any:
    """A copy without autograd history, on the CPU (picklable, cheap to send)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: detached(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(detached(v) for v in value)
    return copy.deepcopy(value)


@dataclass
class StepEntry:
    """One step as this rank computed it."""

    logs: list[tuple[str, Any, dict[str, Any]]] = field(default_factory=list)
    output: Any = None
    grad_norm: Optional[float] = None
    record: Optional[dict[str, Any]] = None  # the metrics.jsonl row (without ``lr``)


@dataclass
class Journal:
    snapshots: dict[int, dict[str, Any]] = field(default_factory=dict)
    steps: dict[int, StepEntry] = field(default_factory=dict)
    after_validation: dict[int, dict[str, Any]] = field(default_factory=dict)
    rows: dict[int, list[tuple[dict[str, Any], Optional[int]]]] = field(default_factory=dict)

    def begin(self, iteration: int, snapshot: dict[str, Any]) -> None:
        self.snapshots[iteration] = snapshot
        for table in (self.snapshots, self.steps, self.after_validation, self.rows):
            for old in [s for s in table if s <= iteration - KEEP]:
                del table[old]

    def step(self, iteration: int) -> StepEntry:
        return self.steps.setdefault(iteration, StepEntry())

    def row(self, iteration: int, metrics: dict[str, Any], step: Optional[int]) -> None:
        self.rows.setdefault(iteration, []).append((detached(metrics), step))

    def package(self, iteration: int) -> dict[str, Any]:
        """What a replacement needs to re-run iteration ``iteration`` with its peers."""
        return {"snapshot": self.snapshots.get(iteration),
                "steps": {s: e for s, e in self.steps.items() if s <= iteration},
                "after_validation": self.after_validation.get(iteration),
                "rows": {s: r for s, r in self.rows.items() if s <= iteration}}

    def adopt(self, package: dict[str, Any], iteration: int) -> None:
        """Take a peer's entries (this rank can then serve the next replacement)."""
        if package.get("snapshot") is not None:
            self.snapshots[iteration] = package["snapshot"]
        self.steps.update(package.get("steps", {}))
        if package.get("after_validation") is not None:
            self.after_validation[iteration] = package["after_validation"]
        for s, rows in package.get("rows", {}).items():
            self.rows[s] = list(rows)
