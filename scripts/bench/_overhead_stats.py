"""What ``overhead.py`` computes from its runs: overheads against each variant's baseline
with their spread over repeats, where the durable saves fall, and their in-run share.

Pure functions of the step times the runs wrote (``metrics.jsonl`` rows, observed by
polling), unit-tested in ``tests/unit/test_bench_overhead_stats.py``.
"""

from __future__ import annotations

import statistics
from typing import Any, Optional


def spread(values: list[float]) -> Optional[dict[str, float]]:
    """Median, min, max and count of ``values`` (None for no values)."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def overheads(runs: dict[str, list[Optional[dict]]], baselines: dict[str, Optional[str]],
              key: str) -> dict[str, dict[str, float]]:
    """Per variant with a baseline: the spread over repeats of (variant / baseline - 1),
    both from the same repeat (a repeat where either failed is left out)."""
    out = {}
    for variant, per_repeat in runs.items():
        base = baselines.get(variant)
        if base is None or base not in runs:
            continue
        ratios = [v[key] / b[key] - 1 for v, b in zip(per_repeat, runs[base])
                  if v and b and key in v and key in b]
        s = spread(ratios)
        if s is not None:
            out[variant] = s
    return out


def percent_spread(s: dict[str, float]) -> str:
    """'+1.23% (+0.40..+2.10%, n=3)': the median with the spread next to it."""
    return (f"{100 * s['median']:+.2f}% ({100 * s['min']:+.2f}..{100 * s['max']:+.2f}%, "
            f"n={s['n']})")


def seconds_spread(s: dict[str, float]) -> str:
    """'0.6123 s (0.6001..0.6301)'."""
    return f"{s['median']:.4f} s ({s['min']:.4f}..{s['max']:.4f})"


def saves_in_window(warmup: int, steps: int, interval: Optional[int]) -> list[int]:
    """Steps after which a scheduled durable save lands inside the measured window.

    The window holds the intervals between rank 0's rows ``warmup + 1`` .. ``steps``; a
    save after step ``s`` delays row ``s + 1`` (or ends the run after the last row, where
    no interval sees it), so it counts when ``warmup + 1 <= s < steps``.
    """
    if not interval:
        return []
    return [s for s in range(interval, steps, interval) if s >= warmup + 1]


def default_steps(warmup: int, interval: int) -> int:
    """Run length whose measured window is exactly one save interval with its save in it:
    rows ``warmup + 1`` .. ``warmup + interval + 1`` (``interval`` intervals)."""
    return warmup + interval + 1


def checkpoint_share(intervals_s: list[float], first_step: int,
                     interval: Optional[int]) -> Optional[float]:
    """The durable saves' share of a run's step time, measured inside the run.

    A save is taken after step s (s % interval == 0); its cost lands in the step
    intervals closing on rows s + 1 (the save blocks the next step) and s (what the
    save's agreement and the step before it overlap). Their excess over the mean of every
    other interval of the same run, per save, divided by ``interval`` mean steps; only
    saves with both intervals inside the window count. Side by
    side in one run, it is immune to the run-to-run drift of a shared machine that
    dominates the spread of the cadence ratio. ``intervals_s[i]`` closes on row
    ``first_step + i``.
    """
    if not interval or interval < 3:
        return None
    last = first_step + len(intervals_s) - 1
    # saves whose two intervals are both in the window (a save after the last row, or one
    # whose first interval falls before the window, is left out of both sides)
    saves = {k for k in range(first_step // interval, last // interval + 1)
             if k >= 1 and k * interval >= first_step and k * interval + 1 <= last}
    near: list[float] = []
    other: list[float] = []
    for i, dt in enumerate(intervals_s):
        step = first_step + i
        if step % interval in (0, 1):
            if step // interval in saves:
                near.append(dt)
            continue
        other.append(dt)
    if not saves or not other:
        return None
    per_save = (sum(near) - len(near) * statistics.mean(other)) / len(saves)
    return per_save / (interval * statistics.mean(other))


def window_cadence(row_times: list[float], warmup: int) -> Optional[tuple[float, list[float]]]:
    """Mean seconds per step over rows ``warmup + 1`` .. last, and the intervals between
    them (``intervals[i]`` closes on row ``warmup + 2 + i``); None if the window is short."""
    window = row_times[warmup:]
    if len(window) < 2:
        return None
    intervals = [b - a for a, b in zip(window, window[1:])]
    return (window[-1] - window[0]) / (len(window) - 1), intervals


def summary(run: list[Optional[dict[str, Any]]], key: str) -> Optional[dict[str, float]]:
    """The spread over repeats of one variant's ``key`` (cadence or step time)."""
    return spread([r[key] for r in run if r and key in r])
