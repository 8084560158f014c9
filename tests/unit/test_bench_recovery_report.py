"""scripts/bench/_recovery_report.py: recovery.py's ratios (strict first), layout and state size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "bench"))
import _recovery_report as report  # noqa: E402


def test_the_ratio_of_totals_keeps_the_step_and_is_the_larger_one():
    r = report.ratios(ours_total_s=1.5, restart_total_s=15.0, fault_free_step_s=1.0)
    assert r["ratio_of_totals"] == pytest.approx(0.1)
    assert r["ratio_one_step_subtracted"] == pytest.approx(0.5 / 14.0)
    assert r["ours_recovery_s"] == pytest.approx(0.5)
    assert r["restart_recovery_s"] == pytest.approx(14.0)
    assert r["ratio_of_totals"] > r["ratio_one_step_subtracted"]


def test_the_headline_prints_the_strict_ratio_first_and_labels_both():
    r = report.ratios(1.5, 15.0, 1.0)
    first, second = report.headline(r, 1.5, 15.0, 1.0, target_step=16)
    assert first.startswith("ratio of totals (strict")
    assert "0.100" in first and "met" in first and "end of step 16" in first
    assert second.startswith("ratio with one fault-free step (1.00 s) subtracted")
    assert "0.036" in second
    missed = report.headline(report.ratios(3.0, 15.0, 1.0), 3.0, 15.0, 1.0, 16)[0]
    assert "missed" in missed


def test_a_restart_no_longer_than_a_step_is_refused():
    with pytest.raises(ValueError, match="not longer than one fault-free step"):
        report.ratios(0.5, 0.9, 1.0)
    with pytest.raises(ValueError, match="not a measurement"):
        report.ratios(0.5, 0.0, 1.0)


def test_state_size_one_copy_and_with_the_replica():
    sizes = report.state_sizes(666_800_000, instances=2)
    assert sizes["state_mb"] == pytest.approx(333.4)
    assert sizes["state_mb_with_replicas"] == pytest.approx(666.8)
    assert report.state_text(sizes) == "333 MB of optimizer state, 667 MB with the replica"
    assert report.state_text(report.state_sizes(100_000_000, 1)) == \
        "100 MB of optimizer state (no replica)"
    assert "3 replicas" in report.state_text(report.state_sizes(400_000_000, 4))


def test_layout_says_whether_the_spare_prebuilds_its_model():
    dp = {"dp": 4, "tp": 1, "pp": 1, "cp": 1, "num_distributed_optimizer_instances": 2}
    assert report.dp_only(dp)
    text = report.layout_text(dp, world_size=4)
    assert text.startswith("4 ranks, DP=4, TP=1, PP=1, CP=1, 2 distributed-optimizer instances")
    assert "DP-only: the warm spare builds its model ahead" in text
    tp = dict(dp, dp=2, tp=2)
    assert not report.dp_only(tp)
    assert "builds its model once assigned" in report.layout_text(tp)
