"""The timeline of one recovery: its phases, written to events.jsonl and logged inline.

The recovery loop marks each phase as it ends (``abort``, ``rendezvous``, ``group_rebuild``,
``state_transfer`` or ``checkpoint_load``); when the first step after the failure completes,
:meth:`RecoveryTimeline.finish` adds ``detect`` (fault to detection, from the generation
records the agents wrote) and ``first_step``, writes one ``recovery_phase`` event per phase
and logs the timeline as a table on rank 0.

A generation can be superseded before its first step (another failure, or an agent's
watch announcing a newer one): the recovery then joins again. Its record spans every
attempt: the phases add up and so do the bytes moved, so a state transfer made by an
earlier attempt is not lost behind a later one that found nothing left to move.
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
    # per state phase ("state_transfer", "checkpoint_load"): what the attempts moved
    moved: dict[str, dict[str, Any]] = field(default_factory=dict)
    attempts: int = 0  # generations joined during this recovery
    resumed_at: Optional[float] = None
    wait_generation: float = 0.0

    def mark(self, phase: str, seconds: float) -> None:
        """Add ``seconds`` to ``phase`` (a recovery that joins twice spends it twice)."""
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def joined(self, gen: int, rendezvous: float, rebuild: float, state: float,
               transfer: dict[str, Any]) -> None:
        """The new generation is joined and the state is consistent again."""
        self.attempts += 1
        self.mark("rendezvous", rendezvous + self.wait_generation)
        self.wait_generation = 0.0
        self.mark("group_rebuild", rebuild)
        phase = "checkpoint_load" if transfer.get("source") == "disk" else "state_transfer"
        self.mark(phase, state)
        self.moved[phase] = _merge(self.moved.get(phase), transfer)
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
        for name, seconds in phases.items():
            extra: dict[str, Any] = {}
            t = self.moved.get(name, {})
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
                extra = {"total_s": now - start, "step": step, "attempts": self.attempts}
            events.write("recovery_phase", generation=self.gen, phase=name,
                         duration_s=seconds, **extra)
        tries = f", {self.attempts} generations joined" if self.attempts > 1 else ""
        log.warning("recovered in %.2fs (generation %d%s)\n%s", now - start, self.gen, tries,
                    self.render(phases, step))

    def render(self, phases: dict[str, float], step: Optional[int]) -> str:
        """The timeline as a small table (the same lines ``make demo`` prints)."""
        lines = []
        for name, seconds in phases.items():
            extra = ""
            t = self.moved.get(name, {})
            if name == "state_transfer" and t.get("bytes"):
                nbytes, secs = t["bytes"], t.get("seconds", 0.0)
                rate = f", {nbytes / 1e6 / secs:.0f} MB/s" if secs else ""
                extra = f"  {nbytes / 1e6:.1f} MB from peers{rate}"
            elif name == "checkpoint_load":
                extra = f"  from the checkpoint of step {t.get('checkpoint_step')}"
            elif name == "first_step" and step is not None:
                extra = f"  -> step {step} done"
            lines.append(f"  {name:<16s}{seconds:8.3f} s{extra}")
        return "\n".join(lines)


def _merge(before: Optional[dict[str, Any]], now: dict[str, Any]) -> dict[str, Any]:
    """What two attempts of one recovery moved: bytes and seconds add up, the ranks
    served join, the step agreed and the checkpoint loaded are the later attempt's."""
    if not before:
        return dict(now)
    out = {**before, **now}
    for key in ("bytes", "seconds"):
        out[key] = before.get(key, 0) + now.get(key, 0)
    raws = [r for r in (before.get("raw_send_seconds"), now.get("raw_send_seconds"))
            if r is not None]
    out["raw_send_seconds"] = sum(raws) if raws else None
    for key in ("replacements", "rolled_forward"):
        out[key] = sorted({*before.get(key, []), *now.get(key, [])})
    return out


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
