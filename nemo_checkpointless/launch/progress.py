"""Hang judgement for one rank, by progress: the agent's verdict from steps and heartbeats.

A rank that reports its steps (``Hello(progress=True)``, then ``Step`` after every step)
is judged by progress, not by its heartbeat:

* **initial** - from its start, a new generation, or a ``Pause`` it announced, to its next
  step: ``hang_initial`` seconds (set-up, NCCL start-up, the first step of a recovery, and
  a wait for a replacement node all fit in it).
* **steady** - between two steps: the larger of ``hang_min`` and ``hang_factor`` times the
  slowest of the last :data:`WINDOW` step times (learned, as NVIDIA's fault-tolerance
  launcher learns its heartbeat timeouts from the intervals it observed). A step time is
  the interval between two ``Step`` messages inside one generation; the interval that
  spans a recovery or a pause is not one.

When the timeout passes, the heartbeat tells a stopped process from a waiting one:

* heartbeat silent for more than half the timeout too (SIGSTOP, a C call that holds the
  GIL): ``KILL`` - the agent kills and replaces the rank.
* heartbeat alive (the process waits in a collective or on the GPU with the GIL released,
  or for a peer that is stuck): after another half timeout (so a culprit on another node
  is found first) ``STALL`` - the agent aborts every rank's communicators by moving the
  job to a new generation. Waiting ranks unwind to recovery (``Unwound``) and carry on;
  a rank that has not unwound ``unwind`` seconds later is killed (``KILL``). A rank that
  reaches recovery by itself (a collective failed) says ``Unwound`` too: from then on it
  waits under the initial timeout, since the wait for a replacement node can be long.

A rank that does not report steps (``Hello(progress=False)``: no in-process recovery, or
a script of its own) keeps the heartbeat rule: killed after ``hang_min`` seconds without
one. A heartbeat never kills a rank that reports progress while it is within its timeout:
holding the GIL for a while in set-up is not a hang.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field
from typing import Optional

WINDOW = 20  # step times remembered for the steady timeout


class Verdict(enum.Enum):
    OK = "ok"
    KILL = "kill"
    STALL = "stall"


class Mode(enum.Enum):
    OFF = "off"  # not judged: a spare waiting, a rank that finished
    HEARTBEAT = "heartbeat"  # does not report progress
    INITIAL = "initial"
    STEADY = "steady"
    UNWINDING = "unwinding"  # its communicators were aborted for a stall


@dataclass
class ProgressWatch:
    """One rank's progress, heartbeats and the verdict on them (times from the caller)."""

    initial: float
    minimum: float
    factor: float
    unwind: float
    now: float
    mode: Mode = Mode.OFF
    deadline: float = float("inf")
    timeout: float = 0.0  # the timeout the deadline was set from
    since: float = 0.0  # start of the current wait (last step, start, notice)
    last_step: Optional[int] = None
    last_step_at: Optional[float] = None
    last_heartbeat: Optional[float] = None
    intervals: "collections.deque[float]" = field(
        default_factory=lambda: collections.deque(maxlen=WINDOW))

    # ------------------------------------------------------------------ events
    def hello(self, progress: bool, now: float) -> None:
        if progress:
            self.expect_first(now)
        else:
            self.mode = Mode.HEARTBEAT

    def expect_first(self, now: float) -> None:
        """Start, assignment, a new generation or a pause: the initial timeout applies."""
        if self.mode is Mode.HEARTBEAT:
            return
        self.mode = Mode.INITIAL
        self.last_step_at = None  # the next interval would span the pause: not a step time
        self._arm(now, self.initial)

    def step(self, step: int, now: float) -> None:
        if self.mode is Mode.HEARTBEAT:
            return
        if self.mode is Mode.STEADY and self.last_step_at is not None:
            self.intervals.append(now - self.last_step_at)
        self.mode = Mode.STEADY
        self.last_step, self.last_step_at = step, now
        self._arm(now, self.steady_timeout())

    def heartbeat(self, now: float) -> None:
        self.last_heartbeat = now

    def stalled(self, now: float) -> None:
        """The agent aborted this rank's communicators: it must unwind within ``unwind``
        (a rank judged by heartbeats only, or not at all, is left as it is)."""
        if self.mode in (Mode.OFF, Mode.HEARTBEAT):
            return
        self.mode = Mode.UNWINDING
        self._arm(now, self.unwind)

    def unwound(self, now: float) -> None:
        """The rank reached recovery (or joined a generation): it is not stuck; its next
        step may take the initial timeout (a wait for a replacement node included)."""
        if self.mode in (Mode.INITIAL, Mode.STEADY, Mode.UNWINDING):
            self.expect_first(now)

    def new_generation(self, now: float) -> None:
        """A recovery: the first step after it gets the initial timeout (a rank still
        unwinding keeps its shorter deadline)."""
        if self.mode in (Mode.INITIAL, Mode.STEADY):
            self.expect_first(now)

    def stop(self) -> None:
        self.mode = Mode.OFF
        self.deadline = float("inf")

    # ------------------------------------------------------------------ judgement
    def steady_timeout(self) -> float:
        slowest = max(self.intervals, default=0.0)
        return max(self.minimum, self.factor * slowest)

    def verdict(self, now: float) -> tuple[Verdict, str]:
        """What to do about this rank now, and why (for the log)."""
        if self.mode is Mode.OFF:
            return Verdict.OK, ""
        if self.mode is Mode.HEARTBEAT:
            if self.last_heartbeat is not None and now - self.last_heartbeat > self.minimum:
                return Verdict.KILL, (f"no heartbeat for {now - self.last_heartbeat:.1f}s "
                                      f"(limit {self.minimum:g}s)")
            return Verdict.OK, ""
        if now <= self.deadline:
            return Verdict.OK, ""
        waited = now - self.since
        if self.mode is Mode.UNWINDING:
            return Verdict.KILL, (f"did not unwind within {self.unwind:g}s after its "
                                  "communicators were aborted (stuck outside any collective)")
        what = ("its first step" if self.mode is Mode.INITIAL
                else f"a step after step {self.last_step}")
        silent = now - (self.last_heartbeat if self.last_heartbeat is not None else self.since)
        if silent > self.timeout / 2:
            return Verdict.KILL, (f"no progress for {waited:.1f}s waiting for {what} (limit "
                                  f"{self.timeout:.1f}s) and no heartbeat for {silent:.1f}s: "
                                  "the process is stopped or holds the GIL")
        if now > self.deadline + self.timeout / 2:
            return Verdict.STALL, (f"no progress for {waited:.1f}s waiting for {what} (limit "
                                   f"{self.timeout:.1f}s) while its heartbeat is alive: "
                                   "waiting in a collective or on the device")
        return Verdict.OK, ""

    def _arm(self, now: float, timeout: float) -> None:
        self.since, self.timeout, self.deadline = now, timeout, now + timeout
