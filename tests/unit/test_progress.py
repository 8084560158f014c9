"""Hang judgement by progress (launch/progress.py), on a clock the test drives."""

from __future__ import annotations

import pytest

from nemo_checkpointless.launch.progress import WINDOW, Mode, ProgressWatch, Verdict


def watch(now: float = 0.0, **kw) -> ProgressWatch:
    args = dict(initial=100.0, minimum=3.0, factor=5.0, unwind=30.0, now=now)
    args.update(kw)
    w = ProgressWatch(**args)
    w.hello(progress=True, now=now)
    return w


def beat(w: ProgressWatch, start: float, end: float, every: float = 0.1) -> None:
    t = start
    while t <= end:
        w.heartbeat(t)
        t += every


def test_setup_gets_the_initial_timeout_even_without_heartbeats():
    """A C call that holds the GIL in set-up silences the heartbeat: not a hang."""
    w = watch()
    w.heartbeat(1.0)
    assert w.verdict(50.0) == (Verdict.OK, "")  # 49 s without a heartbeat, in set-up
    verdict, why = w.verdict(101.5)
    assert verdict is Verdict.KILL and "waiting for its first step" in why


def test_steady_timeout_is_learned_from_step_times():
    w = watch()
    w.step(1, 10.0)  # the first interval would include set-up: not a step time
    assert w.steady_timeout() == 3.0
    for i, t in enumerate([10.5, 11.0, 12.5, 13.0], start=2):
        w.step(i, t)
    assert w.steady_timeout() == pytest.approx(7.5)  # 5 x the slowest (1.5 s)
    beat(w, 13.0, 19.0)
    assert w.verdict(20.0)[0] is Verdict.OK  # within 7.5 s of the last step (judged at 20 s)
    for i in range(WINDOW):  # the slow step leaves the window
        w.step(10 + i, 13.2 + 0.2 * i)
    assert w.steady_timeout() == 3.0


def test_a_stopped_rank_is_killed_at_the_steady_timeout():
    w = watch()
    beat(w, 0.0, 10.0)
    w.step(1, 10.0)
    w.step(2, 10.5)
    beat(w, 10.5, 11.0)  # then SIGSTOP: no step, no heartbeat
    assert w.verdict(13.4)[0] is Verdict.OK
    verdict, why = w.verdict(13.6)
    assert verdict is Verdict.KILL and "no heartbeat" in why and "after step 2" in why


def test_a_waiting_rank_with_a_live_heartbeat_stalls_after_grace():
    w = watch()
    w.step(1, 10.0)
    beat(w, 10.0, 20.0)
    assert w.verdict(14.0)[0] is Verdict.OK  # past the deadline, within the grace
    verdict, why = w.verdict(14.6)
    assert verdict is Verdict.STALL and "heartbeat is alive" in why
    w.stalled(14.6)
    assert w.mode is Mode.UNWINDING
    assert w.verdict(44.0)[0] is Verdict.OK
    verdict, why = w.verdict(44.7)
    assert verdict is Verdict.KILL and "did not unwind" in why


def test_unwinding_then_a_recovery_restarts_from_the_initial_timeout():
    w = watch()
    w.step(1, 10.0)
    w.step(2, 11.0)
    w.stalled(20.0)
    w.new_generation(20.5)  # the notice does not lift the unwind deadline
    assert w.mode is Mode.UNWINDING
    w.unwound(21.0)
    assert w.mode is Mode.INITIAL and w.deadline == 121.0
    w.step(3, 60.0)  # the first step after the recovery: its interval is not a step time
    assert list(w.intervals) == [1.0]


def test_a_rank_that_reached_recovery_by_itself_waits_under_the_initial_timeout():
    """A collective failed (a peer died): the rank unwinds and waits, maybe for a
    replacement node; that wait is not a stall."""
    w = watch()
    w.step(1, 10.0)
    w.step(2, 11.0)
    beat(w, 11.0, 40.0)
    w.unwound(12.0)
    assert w.mode is Mode.INITIAL
    assert w.verdict(40.0)[0] is Verdict.OK  # 29 s without a step, steady limit 5 s


def test_recovery_and_pause_reset_to_the_initial_timeout():
    w = watch()
    w.step(1, 10.0)
    w.step(2, 11.0)
    w.new_generation(12.0)
    assert w.mode is Mode.INITIAL and w.deadline == 112.0
    w.step(3, 40.0)
    w.expect_first(41.0)  # the rank announced a pause
    assert w.deadline == 141.0
    assert list(w.intervals) == [1.0]


def test_ranks_without_progress_keep_the_heartbeat_rule():
    w = ProgressWatch(initial=100.0, minimum=3.0, factor=5.0, unwind=30.0, now=0.0)
    w.hello(progress=False, now=0.0)
    assert w.verdict(50.0)[0] is Verdict.OK  # no heartbeat seen yet
    w.heartbeat(50.0)
    w.step(1, 50.0)  # ignored: it said it does not report progress
    w.new_generation(51.0)
    assert w.verdict(52.9)[0] is Verdict.OK
    verdict, why = w.verdict(53.1)
    assert verdict is Verdict.KILL and "no heartbeat for 3.1s" in why


def test_finished_ranks_are_not_judged():
    w = watch()
    w.step(1, 1.0)
    w.stop()
    assert w.verdict(1e6)[0] is Verdict.OK
