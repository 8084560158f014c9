"""scripts/bench/_overhead_stats.py: overheads against each variant's own baseline with
their spread, where the durable saves fall in the window, and their in-run share."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "bench"))
import _overhead_stats as stats  # noqa: E402


def test_each_variant_is_compared_with_its_own_baseline_in_the_same_repeat():
    runs = {"off": [{"c": 1.0}, {"c": 2.0}, {"c": 1.0}],
            "off@tp2": [{"c": 3.0}, {"c": 3.0}, None],
            "tier1": [{"c": 1.01}, {"c": 2.04}, {"c": 1.03}],
            "tier2": [{"c": 3.3}, {"c": 3.0}, {"c": 9.9}]}
    baselines = {"off": None, "off@tp2": None, "tier1": "off", "tier2": "off@tp2"}
    out = stats.overheads(runs, baselines, "c")
    assert set(out) == {"tier1", "tier2"}
    assert out["tier1"]["median"] == pytest.approx(0.02)
    assert out["tier1"]["min"] == pytest.approx(0.01)
    assert out["tier1"]["max"] == pytest.approx(0.03)
    assert out["tier1"]["n"] == 3
    # the repeat whose baseline failed is left out, not compared with another repeat's
    assert out["tier2"]["n"] == 2
    assert out["tier2"]["min"] == pytest.approx(0.0)
    assert out["tier2"]["max"] == pytest.approx(0.1)


def test_the_median_is_printed_with_its_spread():
    s = stats.spread([0.004, 0.012, 0.021])
    assert stats.percent_spread(s) == "+1.20% (+0.40..+2.10%, n=3)"
    assert stats.seconds_spread(stats.spread([0.61, 0.6, 0.63])) == "0.6100 s (0.6000..0.6300)"
    assert stats.spread([]) is None


def test_the_default_run_holds_exactly_one_save_interval_with_its_save():
    steps = stats.default_steps(warmup=4, interval=100)
    assert steps == 105
    assert stats.saves_in_window(4, steps, 100) == [100]
    # a save after the last row is seen by no interval; one inside the warm-up neither
    assert stats.saves_in_window(4, 100, 100) == []
    assert stats.saves_in_window(4, 20, 100) == []
    assert stats.saves_in_window(2, 7, 4) == [4]
    assert stats.saves_in_window(2, 7, None) == []


def test_window_cadence_skips_the_warm_up_rows():
    times = [0.0, 5.0, 6.0, 7.0, 8.5, 9.5]  # rows 1..6; warm-up 2 leaves rows 3..6
    cadence, intervals = stats.window_cadence(times, warmup=2)
    assert cadence == pytest.approx((9.5 - 6.0) / 3)
    assert intervals == pytest.approx([1.0, 1.5, 1.0])
    assert stats.window_cadence(times[:3], warmup=2) is None


def test_checkpoint_share_charges_the_intervals_next_to_each_save():
    interval, first_step = 10, 4  # intervals close on rows 4, 5, ...
    steps = list(range(first_step, 31))
    # 1 s a step; each save (after steps 10, 20) adds 0.3 s to row s+1 and 0.1 s to row s
    intervals = [1.0 + (0.3 if s % interval == 1 else 0.1 if s % interval == 0 else 0.0)
                 for s in steps]
    share = stats.checkpoint_share(intervals, first_step, interval)
    assert share == pytest.approx(0.4 / (10 * 1.0))
    # too short an interval to tell a save from its neighbours
    assert stats.checkpoint_share(intervals, first_step, 2) is None
    assert stats.checkpoint_share(intervals, first_step, None) is None
