"""scripts/bench/_goodput_report.py: references interleaved with the chaos runs, the
end-to-end figure against each neighbour, the spread over seeds, and "not run"."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "bench"))
import _goodput_report as report  # noqa: E402


def kinds(order):
    return ["R" if s.reference else f"{s.mode}{s.seed}" for s in order]


def test_references_are_interleaved_with_the_chaos_runs():
    order = report.run_order(["a", "b"], [0, 1])
    assert kinds(order) == ["R", "a0", "R", "b0", "R", "a1", "R", "b1", "R"]
    assert [s.index for s in order] == list(range(9))
    assert kinds(report.run_order(["a", "b"], [0], interleaved=False)) == ["R", "a0", "b0", "R"]
    # every chaos run has a reference on each side
    for slot in order:
        if not slot.reference:
            before, after = report.neighbours(order, slot)
            assert before.index == slot.index - 1 and after.index == slot.index + 1
    ends = report.run_order(["a", "b"], [0], interleaved=False)
    before, after = report.neighbours(ends, ends[2])
    assert (before.index, after.index) == (0, 3)


def test_end_to_end_against_each_neighbour_and_their_drift():
    e = report.end_to_end(wall_s=110.0, before_s=100.0, after_s=110.0)
    assert e["vs_before"] == pytest.approx(0.9091, abs=1e-4)
    assert e["vs_after"] == pytest.approx(1.0)
    assert e["vs_mean"] == pytest.approx(105 / 110, abs=1e-4)
    assert e["reference_drift"] == pytest.approx(0.1)
    lone = report.end_to_end(110.0, 100.0, None)
    assert lone["vs_after"] is None and lone["vs_mean"] == lone["vs_before"]
    assert lone["reference_drift"] is None


def test_a_mode_that_did_not_run_is_not_run_and_a_failed_one_says_so():
    results = {"checkpointless": report.ModeResult("checkpointless", True),
               "checkpoint-restart": report.ModeResult("checkpoint-restart", False)}
    results["checkpointless"].runs.append(
        {"in_run": 0.953, "end_to_end": report.end_to_end(100.0, 95.0, 97.0)})
    assert report.title_figures(results) == "checkpointless 0.953, checkpoint-restart not run"
    assert report.value(results["checkpointless"]) == 0.953
    assert report.value(results["checkpoint-restart"]) == "not run"
    text = "\n".join(report.headline_lines(results))
    assert "0.000" not in text and "checkpoint-restart   not run" in text
    assert text.index("in-run accounting") < text.index("end to end")
    failed = report.ModeResult("checkpoint-restart", True, errors=["seed 0: exit 1"])
    assert failed.status == "failed"
    assert report.figure(failed.in_run(), failed.status) == "failed"
    assert "checkpoint-restart: failed: seed 0: exit 1" in "\n".join(
        report.headline_lines({"checkpoint-restart": failed}))


def test_several_seeds_print_the_median_with_the_spread():
    res = report.ModeResult("checkpointless", True)
    for g, wall in ((0.95, 100.0), (0.97, 104.0), (0.91, 98.0)):
        res.runs.append({"in_run": g, "end_to_end": report.end_to_end(wall, 95.0, 96.0)})
    assert report.figure(res.in_run()) == "0.950 (0.910..0.970, n=3)"
    assert res.e2e()["n"] == 3
    assert res.status == "ok"
    res.errors.append("seed 3: timeout")
    assert res.status == "partly failed"


def test_failures_without_a_cost_of_their_own_are_said_so():
    res = report.ModeResult("checkpoint-restart", True)
    res.runs.append({"in_run": 0.4, "failure_costs_s": [27.9, None, None],
                     "end_to_end": report.end_to_end(100.0, 95.0, 96.0)})
    assert res.costs_measured() == (1, 3)
    line = report.headline_lines({"checkpoint-restart": res})[1]
    assert "0.400  (cost measured for 1 of 3 failures" in line
    assert "largest measured cost)" in line
    none = report.ModeResult("checkpointless", True)
    none.runs.append({"in_run": 1.0, "failure_costs_s": [None],
                      "end_to_end": report.end_to_end(100.0, 95.0, 96.0)})
    assert "none measured, so they count as 0" in report.headline_lines({"x": none})[1]
    full = report.ModeResult("checkpointless", True)
    full.runs.append({"in_run": 0.9, "failure_costs_s": [1.0],
                      "end_to_end": report.end_to_end(100.0, 95.0, 96.0)})
    assert report.headline_lines({"x": full})[1].rstrip().endswith("0.900")
