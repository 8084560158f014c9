"""Goodput accounting from a trace of committed steps: what each failure cost, in-run.

A *trace* is what an observer of the job saw: (seconds since the first step started, the
last committed step) pairs, and the failures that hit the job with when they fired and at
which committed step. :func:`failure_costs` charges each failure the time the job took to
get ``k`` steps past it beyond what ``k`` steps cost at the rate the same run kept just
before it; :func:`in_run_goodput` is 1 minus those costs over the wall time. Both are
measured within one run, so the machine's drift between runs cannot push them past 1.
``scripts/bench/goodput.py`` records the traces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Failure:
    at: float  # seconds after the first step started
    kind: str  # "rank" or "node"
    target: int  # rank id or node rank
    fired_at: Optional[float] = None  # seconds after the first step, when it happened
    last_step: Optional[int] = None  # the job's last committed step when it fired


@dataclass
class Trace:
    """What the driver saw: (seconds since the first step started, last committed step)."""

    points: list[tuple[float, int]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    t_first: float = 0.0
    t_end: float = 0.0
    lost_steps: int = 0


def failure_costs(trace: Trace, after: int = 50, before: int = 50) -> list[Optional[float]]:
    """Seconds each failure cost, measured inside the chaos run itself.

    For a failure that hit the job at committed step ``s``: the time from the commit of
    ``s`` until the job is ``k`` steps further (``k`` = ``after``, or fewer when the next
    failure or the end of the run comes sooner), minus ``k`` steps at the rate the same run kept over the up to
    ``before`` steps ahead of ``s`` (from 2 steps past the previous failure on). That charges
    detection, recovery or restart, replayed steps and the slower steps after a recovery
    (spare refill, warm-up) to the failure, and leaves out what the job pays without
    failures (tier overhead, checkpoint writes): that is in the end-to-end goodput and in
    ``scripts/bench/overhead.py``. Resolution: the driver's 50 ms poll.
    """
    pts = trace.points

    def reached(step: int, since: float) -> Optional[float]:
        return next((t for t, s in pts if t >= since and s >= step), None)

    costs: list[Optional[float]] = []
    steady_since = 0.0  # when the previous failure's job was 2 steps past it again
    for i, f in enumerate(trace.failures):
        s, fired = f.last_step or 0, f.fired_at or 0.0
        nxt = trace.failures[i + 1].last_step if i + 1 < len(trace.failures) else None
        k = min(after, (nxt - s) if nxt is not None else after, pts[-1][1] - s if pts else 0)
        t0 = max((t for t, st in pts if st == s and t <= fired), default=None)
        t1 = reached(s + k, fired)
        window = [(t, st) for t, st in pts if steady_since <= t <= fired and s - before <= st <= s]
        if k < 1 or t0 is None or t1 is None or len(window) < 2 or window[-1][1] - window[0][1] < 5:
            costs.append(None)  # too close to the start or to another failure
        else:
            rate = (window[-1][0] - window[0][0]) / (window[-1][1] - window[0][1])
            costs.append(round(t1 - t0 - k * rate, 3))
        steady_since = reached(s + 2, fired) or float("inf")
    return costs


def in_run_goodput(trace: Trace, costs: list[Optional[float]]) -> float:
    """1 - (time the failures cost, :func:`failure_costs`) / the chaos run's wall time: the
    issue's "time spent in steps that count / wall time", measured within one run, so free
    of the machine's drift between runs (a failure whose cost could not be measured, at
    the very start, is charged the largest measured cost)."""
    worst = max((c for c in costs if c is not None), default=0.0)
    lost = sum(worst if c is None else c for c in costs)
    return round(1 - lost / trace.t_end, 4) if trace.t_end else 0.0
