"""The timeline of one recovery: its phases, written to events.jsonl and logged inline.

The recovery loop marks each phase as it ends (``abort``, ``rendezvous``, ``group_rebuild``,
``state_transfer`` or ``checkpoint_load``); when the first step after the failure completes,
:meth:`RecoveryTimeline.finish` adds ``detect`` (fault to detection, from the generation
records the agents wrote) and ``first_step``, writes one ``recovery_phase`` event per phase
and logs the timeline as a table on rank 0.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .events import EventLog

log = logging.getLogger("ncl.recovery")


@dataclass
class RecoveryTimeline:
    """One recovery, from the failure's detection to the first completed step after it."""

    detected: float = field(default_factory=time.time)  # wall clock
    from_gen: int = -1
    gen: Optional[int] = None
    phases: dict[str, float] = field(default_factory=dict)
    transfer: dict[str, Any] = field(default_factory=dict)
    resumed_at: Optional[float] = None
    wait_generation: float = 0.0

    def mark(self, phase: str, seconds: float) -> None:
        self.phases[phase] = seconds

    def joined(self, gen: int, rendezvous: float, rebuild: float, state: float,
               transfer: dict[str, Any]) -> None:
        """The new generation is joined and the state is consistent again."""
        self.mark("rendezvous", rendezvous + self.wait_generation)
        self.mark("group_rebuild", rebuild)
        self.mark("checkpoint_load" if transfer.get("source") == "disk" else "state_transfer",
                  state)
        self.transfer = transfer
        self.gen = gen
        self.resumed_at = time.time()

    def finish(self, events: EventLog, generations: Any, step: Optional[int],
               lead: bool) -> None:
        """The first step after the failure completed: write and log the timeline.

        ``generations``: the job store, whose ``gen/<g>`` records say when each failure
        was caused (``fault_at``, for injected faults) and detected (``detected_at``)."""
        if not lead or self.gen is None or self.resumed_at is None:
            return
        now = time.time()
        fault_at, detected_at = _fault_times(generations, self.from_gen, self.gen)
        start = fault_at or detected_at or self.detected
        phases = dict(self.phases)
        if fault_at and detected_at:
            phases = {"detect": max(0.0, detected_at - fault_at), **phases}
        phases["first_step"] = now - self.resumed_at
        t = self.transfer
        for name, seconds in phases.items():
            extra: dict[str, Any] = {}
            if name == "checkpoint_load":
                extra = {"bytes": t.get("bytes", 0), "checkpoint_step": t.get("checkpoint_step")}
            elif name == "state_transfer":
                nbytes, secs, raw = t.get("bytes", 0), t.get("seconds", 0.0), t.get("raw_send_seconds")
                extra = {"bytes": nbytes, "mb_per_s": (nbytes / 1e6 / secs) if secs else None,
                         "raw_send_mb_per_s": (nbytes / 1e6 / raw) if raw else None,
                         "replacements": t.get("replacements", []),
                         "rolled_forward": t.get("rolled_forward", []),
                         "committed_step": t.get("committed_step")}
            elif name == "first_step":
                extra = {"total_s": now - start, "step": step}
            events.write("recovery_phase", generation=self.gen, phase=name,
                         duration_s=seconds, **extra)
        log.warning("recovered in %.2fs (generation %d)\n%s", now - start, self.gen,
                    self.render(phases, step))

    def render(self, phases: dict[str, float], step: Optional[int]) -> str:
        """The timeline as a small table (the same lines ``make demo`` prints)."""
        lines = []
        for name, seconds in phases.items():
            extra = ""
            if name == "state_transfer" and self.transfer.get("bytes"):
                nbytes, secs = self.transfer["bytes"], self.transfer.get("seconds", 0.0)
                rate = f", {nbytes / 1e6 / secs:.0f} MB/s" if secs else ""
                extra = f"  {nbytes / 1e6:.1f} MB from peers{rate}"
            elif name == "checkpoint_load":
                extra = f"  from the checkpoint of step {self.transfer.get('checkpoint_step')}"
            elif name == "first_step" and step is not None:
                extra = f"  -> step {step} done"
            lines.append(f"  {name:<16s}{seconds:8.3f} s{extra}")
        return "\n".join(lines)


def _fault_times(store: Any, from_gen: int, to_gen: int) -> tuple[Optional[float], Optional[float]]:
    faults, detects = [], []
    for g in range(max(from_gen, 0) + 1, to_gen + 1):
        try:
            record = json.loads(store.get(f"gen/{g}"))
        except Exception:  # noqa: BLE001 - a record lost with a store shard: no detect phase
            continue
        if record.get("fault_at"):
            faults.append(float(record["fault_at"]))
        if record.get("detected_at"):
            detects.append(float(record["detected_at"]))
    return (min(faults) if faults else None, min(detects) if detects else None)
