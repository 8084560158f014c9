"""What ``goodput.py`` reports: the run order (fault-free references interleaved with the
chaos runs), the end-to-end figure against each neighbouring reference, the spread over
seeds, and the text, with a mode that did not run shown as not run.

The headline is the in-run accounting (``nemo_checkpointless/metrics/goodput.py``): each
failure's cost is measured inside the chaos run itself, so the machine's drift between
runs cannot push it past 1. The end-to-end figure (a fault-free run's time for the same
steps over the chaos run's wall time) is given beside it, against the reference run just
before and the one just after each chaos run. Pure functions, unit-tested in
``tests/unit/test_bench_goodput_report.py``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Optional

NOT_RUN = "not run"


@dataclass(frozen=True)
class Slot:
    """One run of the benchmark: a fault-free reference (``mode`` None) or a chaos run."""

    index: int  # position in the order
    mode: Optional[str] = None
    seed: Optional[int] = None

    @property
    def reference(self) -> bool:
        return self.mode is None


def run_order(modes: list[str], seeds: list[int], interleaved: bool = True) -> list[Slot]:
    """References and chaos runs in the order they run.

    ``interleaved``: a reference before every chaos run and one after the last (R C R C R),
    so each chaos run has a fault-free run on each side, at most one run away; otherwise
    one reference before the first chaos run and one after the last (R C C R).
    """
    chaos = [(seed, mode) for seed in seeds for mode in modes]
    out: list[Slot] = [Slot(0)]
    for i, (seed, mode) in enumerate(chaos):
        out.append(Slot(len(out), mode, seed))
        if interleaved or i == len(chaos) - 1:
            out.append(Slot(len(out)))
    return out


def neighbours(order: list[Slot], slot: Slot) -> tuple[Optional[Slot], Optional[Slot]]:
    """The references just before and just after a chaos run."""
    before = next((s for s in reversed(order[:slot.index]) if s.reference), None)
    after = next((s for s in order[slot.index + 1:] if s.reference), None)
    return before, after


def end_to_end(wall_s: float, before_s: Optional[float], after_s: Optional[float]) -> dict:
    """Fault-free time over the chaos run's wall time, against each neighbour and their
    mean (a neighbour that did not finish is None)."""
    def vs(ref: Optional[float]) -> Optional[float]:
        return round(ref / wall_s, 4) if ref and wall_s else None

    refs = [r for r in (before_s, after_s) if r]
    return {"vs_before": vs(before_s), "vs_after": vs(after_s),
            "vs_mean": vs(sum(refs) / len(refs)) if refs else None,
            "reference_before_s": before_s, "reference_after_s": after_s,
            "reference_drift": (round(after_s / before_s - 1, 4)
                                if before_s and after_s else None)}


def spread(values: list[Optional[float]]) -> Optional[dict[str, float]]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": round(statistics.median(vals), 4), "min": round(min(vals), 4),
            "max": round(max(vals), 4), "n": len(vals)}


@dataclass
class ModeResult:
    """What one mode gave over the seeds; ``runs`` holds one dict per finished chaos run
    (``in_run``, ``end_to_end``, ...), ``errors`` the ones that failed."""

    mode: str
    requested: bool
    runs: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if not self.requested:
            return NOT_RUN
        if not self.runs:
            return "failed" if self.errors else NOT_RUN
        return "ok" if not self.errors else "partly failed"

    def in_run(self) -> Optional[dict[str, float]]:
        return spread([r["in_run"] for r in self.runs])

    def e2e(self, key: str = "vs_mean") -> Optional[dict[str, float]]:
        return spread([r["end_to_end"][key] for r in self.runs])

    def costs_measured(self) -> tuple[int, int]:
        """(failures whose cost was measured, failures) over the runs: a failure too close
        to the start or to another one has no cost of its own and is charged the run's
        largest measured cost (``metrics.goodput.in_run_goodput``)."""
        costs = [c for r in self.runs for c in r.get("failure_costs_s", [])]
        return sum(c is not None for c in costs), len(costs)


def figure(s: Optional[dict[str, float]], status: str = "ok") -> str:
    """'0.953', or with several runs '0.953 (0.941..0.960, n=3)'; else the status."""
    if s is None:
        return status if status != "ok" else NOT_RUN
    if s["n"] == 1:
        return f"{s['median']:.3f}"
    return f"{s['median']:.3f} ({s['min']:.3f}..{s['max']:.3f}, n={s['n']})"


def value(res: ModeResult) -> Any:
    """For the JSON: the median in-run goodput, or the status when there is none."""
    s = res.in_run()
    return s["median"] if s is not None else res.status


def headline_lines(results: dict[str, ModeResult]) -> list[str]:
    """The printed summary: in-run first (the headline), end to end beside it."""
    lines = ["goodput, in-run accounting (headline: each failure's cost measured inside the "
             "chaos run, so the machine's drift between runs cannot move it):"]
    for mode, res in results.items():
        line = f"  {mode:20s} {figure(res.in_run(), res.status)}"
        measured, failures = res.costs_measured()
        if measured < failures:
            line += (f"  (cost measured for {measured} of {failures} failures; the others, "
                     "too close to the start or to another failure, are charged the run's "
                     "largest measured cost" + (": none measured, so they count as 0"
                                                if measured == 0 else "") + ")")
        lines.append(line)
    lines.append("goodput end to end (fault-free time of the same steps / chaos wall time), "
                 "against the reference run before and the one after each chaos run:")
    for mode, res in results.items():
        if not res.runs:
            lines.append(f"  {mode:20s} {res.status}")
            continue
        lines.append(f"  {mode:20s} vs before {figure(res.e2e('vs_before'))}, vs after "
                     f"{figure(res.e2e('vs_after'))}, vs their mean {figure(res.e2e())}")
    for mode, res in results.items():
        for err in res.errors:
            lines.append(f"  {mode}: failed: {err}")
    return lines


def title_figures(results: dict[str, ModeResult]) -> str:
    """For the plot title: 'checkpointless 0.953, checkpoint-restart not run'."""
    return ", ".join(f"{mode} {figure(res.in_run(), res.status)}"
                     for mode, res in results.items())
