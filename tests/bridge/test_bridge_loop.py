"""Bridge's loop as a coroutine (bridge/loop.py): strict hand-over, errors, the end."""

from __future__ import annotations

import threading

import pytest

from nemo_checkpointless.bridge.loop import BOUNDARY, FINISHED, BridgeLoop


class FakeTrain:
    """Stands in for Bridge's train(): a gated step, then post-step work, per iteration."""

    def __init__(self, iterations: int, fail_at: int = 0) -> None:
        self.iterations, self.fail_at = iterations, fail_at
        self.events: list = []
        self.running = threading.Event()
        self.loop = BridgeLoop(self.run, prepare_thread=lambda: self.events.append("thread"))

    def run(self) -> None:
        for step in range(1, self.iterations + 1):
            self.loop.gate(step)
            self.running.set()
            if step == self.fail_at:
                raise RuntimeError(f"collective failed in step {step}")
            self.events += [("step", step), ("validate", step)]
            self.running.clear()
        self.events.append("end")


def test_one_step_and_its_post_step_work_per_advance():
    train = FakeTrain(3)
    assert train.loop.advance(1) == BOUNDARY
    assert train.events == ["thread", ("step", 1), ("validate", 1)]
    assert not train.running.is_set()  # the loop thread waits while the caller runs
    assert train.loop.advance(2) == BOUNDARY
    assert train.events[-2:] == [("step", 2), ("validate", 2)]
    assert train.loop.advance(3) == FINISHED
    assert train.events[-1] == "end" and not train.loop.alive


def test_an_error_in_the_loop_is_raised_in_the_caller_and_ends_the_loop():
    train = FakeTrain(4, fail_at=2)
    train.loop.advance(1)
    with pytest.raises(RuntimeError, match="collective failed in step 2"):
        train.loop.advance(2)
    assert not train.loop.alive
    with pytest.raises(RuntimeError, match="start a new one"):
        train.loop.advance(3)


def test_a_fresh_loop_starts_where_the_caller_says():
    events: list = []
    loop: BridgeLoop

    def run() -> None:
        for step in range(3, 5):  # train() resumed at the committed step 2
            loop.gate(step)
            events.append(step)

    loop = BridgeLoop(run, prepare_thread=lambda: None)
    assert loop.advance(3) == BOUNDARY and events == [3]
    assert loop.advance(4) == FINISHED and events == [3, 4]
