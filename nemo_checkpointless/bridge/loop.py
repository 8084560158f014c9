"""Bridge's ``train()`` as a coroutine: it runs on a thread of its own and hands control
back to the recovery loop at every step boundary.

The recovery loop asks for one committed step at a time (``StepDriver.train_step``), while
Bridge's ``train()`` owns its loop: between two steps it decides logging, validation,
checkpoint saving and timers itself. :class:`BridgeLoop` lets both be true. ``train()``
runs on a worker thread; the two threads never run at once (strict hand-over), so the
pair behaves as one thread with ``train()`` suspended inside itself:

* :meth:`BridgeLoop.advance` lets ``train()`` run until it is about to start step
  ``target + 1`` (so step ``target`` and everything Bridge does after it are done), or
  until ``train()`` returns;
* :meth:`BridgeLoop.gate` is called by the step function at the start of each step: it
  hands control back when the step is past the target, and waits to be resumed;
* an exception anywhere in ``train()`` ends the thread and is raised from ``advance`` in
  the recovery loop's thread, which classifies it and recovers; the next ``advance``
  starts a fresh ``train()`` from the committed step.

The thread is a daemon: a process that stops with ``train()`` suspended does not wait for
it.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

FINISHED = "finished"
BOUNDARY = "boundary"


class BridgeLoop:
    """One run of Bridge's ``train()`` on a worker thread (see module doc)."""

    def __init__(self, run: Callable[[], Any], prepare_thread: Callable[[], None]) -> None:
        self._run = run
        self._prepare_thread = prepare_thread
        self._cond = threading.Condition()
        self._bridge_turn = False
        self._target = 0
        self._outcome: Optional[str] = None
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self.alive = True

    # ------------------------------------------------------------------ recovery side
    def advance(self, target: int) -> str:
        """Run ``train()`` until step ``target`` and Bridge's work after it are done;
        returns :data:`BOUNDARY` or :data:`FINISHED`, or raises what ``train()`` raised."""
        if not self.alive:
            raise RuntimeError("Bridge's loop has ended; start a new one")
        with self._cond:
            self._target = target
            self._outcome = None
            self._bridge_turn = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="bridge-train",
                                                daemon=True)
                self._thread.start()
            else:
                self._cond.notify_all()
            while self._bridge_turn:
                self._cond.wait()
            outcome, error = self._outcome, self._error
        if error is not None:
            self.alive = False
            self._error = None
            raise error
        assert outcome is not None
        if outcome == FINISHED:
            self.alive = False
        return outcome

    # ------------------------------------------------------------------ Bridge side
    def gate(self, step: int) -> None:
        """Called at the start of step ``step``: past the target, wait to be resumed."""
        with self._cond:
            while step > self._target:
                self._hand_back(BOUNDARY)
                while not self._bridge_turn:
                    self._cond.wait()

    def _hand_back(self, outcome: str, error: Optional[BaseException] = None) -> None:
        self._outcome, self._error = outcome, error
        self._bridge_turn = False
        self._cond.notify_all()

    def _main(self) -> None:
        try:
            self._prepare_thread()
            self._run()
        except BaseException as err:  # noqa: BLE001 - raised again in the recovery thread
            with self._cond:
                self._hand_back("error", err)
            return
        with self._cond:
            self._hand_back(FINISHED)
