"""Goodput accounting (nemo_checkpointless/metrics/goodput.py): what each failure cost,
measured from the trace of committed steps the benchmark's driver records."""

from __future__ import annotations

from nemo_checkpointless.metrics.goodput import Failure, Trace, failure_costs, in_run_goodput


def steady(trace: Trace, t: float, step: int, n: int, dt: float) -> tuple[float, int]:
    for _ in range(n):
        t, step = t + dt, step + 1
        trace.points.append((round(t, 6), step))
    return t, step


def test_a_recovery_gap_is_charged_and_the_steady_rate_is_not():
    trace = Trace()
    t, s = steady(trace, 0.0, 0, 100, 0.3)  # 100 steps at 0.3 s
    trace.failures.append(Failure(at=30.0, kind="rank", target=1, fired_at=t + 0.1, last_step=s))
    t += 1.5  # 1.2 s of recovery, then the step itself
    t, s = steady(trace, t - 0.3, s, 100, 0.3)
    trace.t_end = t
    (cost,) = failure_costs(trace)
    assert abs(cost - 1.2) < 1e-6
    assert abs(in_run_goodput(trace, [cost]) - (1 - 1.2 / t)) < 1e-4


def test_a_restart_that_replays_steps_is_charged_the_replay():
    trace = Trace()
    t, s = steady(trace, 0.0, 0, 100, 0.3)
    trace.failures.append(Failure(at=30.0, kind="rank", target=0, fired_at=t + 0.1, last_step=s))
    # restart: 10 s down, then resume from the checkpoint at step 90 and replay 91..100
    t += 10.0
    trace.points.append((t, 90))
    t, s = steady(trace, t, 90, 60, 0.3)
    trace.t_end = t
    (cost,) = failure_costs(trace, after=50)
    assert abs(cost - (10.0 + 10 * 0.3)) < 1e-6  # downtime plus the 10 replayed steps


def test_windows_stop_at_the_next_failure_and_a_failure_at_the_start_is_charged_the_worst():
    trace = Trace()
    trace.failures.append(Failure(at=0.0, kind="rank", target=1, fired_at=0.05, last_step=0))
    t = 2.0
    trace.points.append((t, 1))
    t, s = steady(trace, t, 1, 20, 0.3)
    trace.failures.append(Failure(at=8.0, kind="rank", target=2, fired_at=t + 0.1, last_step=s))
    t += 0.8
    t, s = steady(trace, t - 0.3, s, 30, 0.3)
    trace.t_end = t
    costs = failure_costs(trace, after=50)
    assert costs[0] is None  # no steady steps before it to measure the rate from
    assert abs(costs[1] - 0.5) < 1e-6
    assert abs(in_run_goodput(trace, costs) - (1 - 1.0 / t)) < 1e-4
