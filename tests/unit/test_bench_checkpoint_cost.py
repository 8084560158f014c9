"""The checkpoint benchmark's in-run cost: iterations that overlap a save against the rest."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "scripts" / "bench" / "checkpoint.py"
_spec = importlib.util.spec_from_file_location("bench_checkpoint", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def spans(durations):
    out, t = [], 0.0
    for d in durations:
        out.append((t, t + d))
        t += d
    return out


def test_no_save_costs_nothing():
    assert bench.in_run_cost(spans([1.0] * 10), []) == 0.0


def test_a_save_costs_what_its_iterations_took_beyond_the_median():
    # ten 1 s iterations; the save runs during the 4th and 5th, which took 1.5 s and 1.1 s
    it = spans([1, 1, 1, 1.5, 1.1, 1, 1, 1, 1, 1])
    cost = bench.in_run_cost(it, [(3.2, 4.9)])
    assert cost == pytest.approx((0.5 + 0.1) / 10.6)


def test_a_save_that_slows_nothing_costs_about_zero():
    it = spans([1.0] * 10)
    assert bench.in_run_cost(it, [(2.5, 3.5), (7.1, 7.2)]) == pytest.approx(0.0)
