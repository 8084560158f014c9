"""The rank's side of the agent channel: heartbeats, progress, generation notices, spares.

A daemon thread sends a heartbeat every ``interval`` seconds (the process lives: a
SIGSTOPped process stops sending) and reads the agent's messages (``launch/protocol.py``).
The training loop itself reports progress: :meth:`AgentLink.progress` after every step,
:meth:`AgentLink.pause` before work of unknown length outside the step loop; the agent
judges hangs by that progress (``launch/progress.py``), so a thread that cannot run (a
C call holding the GIL) is not mistaken for a hang, and a hang that releases the GIL is
seen. When the agent announces a generation newer than the one this rank is active in,
``on_new_generation`` runs on that thread: it aborts the communicators, and interrupts a
store wait of the old generation (:meth:`AgentLink.while_stale`), so the main thread
unwinds at once.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, NoReturn, Optional

from ..launch import protocol
from ..launch.channel import Channel
from ..steps import Phase
from ..timeouts import Timeouts

log = logging.getLogger(__name__)


class AgentLink:
    """Heartbeats to, and notices from, the node agent."""

    def __init__(self, channel: Channel, on_new_generation: Callable[[int], None],
                 interval: float = 0.1, stuck_after: float = 0.0,
                 abort_grace: float = 0.0) -> None:
        self.channel = channel
        self.on_new_generation = on_new_generation
        self.interval = interval
        self.active_gen = -1
        self.latest_gen = -1
        self.assignments: "queue.Queue[protocol.Assign]" = queue.Queue()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="ncl-agent-link", daemon=True)
        self.closed = False
        self.stop_requested = False  # the agent sent Stop (read by the commit barrier)
        # watchdog: a main thread that has not begun recovering this long after an abort is
        # aborted again, and its stacks are logged once more later (a gloo wait that the
        # shut-down sockets did not wake ends at the collective timeout, NCL_PG_TIMEOUT_S)
        self.stuck_after = stuck_after or Timeouts.from_env().stuck_after_s
        self._aborted_at: Optional[float] = None
        self._reaborted = False
        # grace: a new generation is announced at once, but the communicators are aborted
        # only if the main thread has not left training by itself within ``abort_grace``
        # seconds. On gloo, shutting down this process's own sockets does not wake a send
        # that waits for its peer to post the receive (it ends only at the collective
        # timeout), so aborting an operation between two healthy ranks mid-flight can
        # stall a rank; every operation that involves the dead rank fails on its own
        # (the kernel closed its sockets), and the others finish in well under a second.
        self.abort_grace = abort_grace
        self._abort_due: Optional[float] = None

    def start(self) -> "AgentLink":
        self._thread.start()
        return self

    def _run(self) -> None:
        last = 0.0
        while True:
            now = time.monotonic()
            if now - last >= self.interval:
                self.channel.send(protocol.Heartbeat())
                last = now
            messages = self.channel.receive(timeout=self.interval)
            if messages is None:
                log.error("the node agent closed the channel")
                self.closed = True
                with self._cond:
                    self._cond.notify_all()
                return
            for msg in messages:
                self._handle(msg)
            self._abort_when_due()
            self._watchdog()

    def _watchdog(self) -> None:
        with self._cond:
            since = self._aborted_at
            pending = self.latest_gen > self.active_gen >= 0
        if since is None or not pending:
            return
        waited = time.monotonic() - since
        if waited > self.stuck_after and not self._reaborted:
            self._reaborted = True
            log.warning("the main thread is still blocked %.0fs after the abort: aborting "
                        "again; its stacks follow", waited)
            faulthandler.dump_traceback(all_threads=True)
            self.on_new_generation(self.latest_gen)
        elif waited > 2 * self.stuck_after and self._reaborted:
            # an operation no abort reaches (e.g. a communicator blocked in its set-up):
            # this process cannot rejoin; leave, and the agent replaces it like a failure
            log.error("the main thread is still blocked %.0fs after two aborts: exiting so "
                      "that the agent replaces this rank", waited)
            faulthandler.dump_traceback(all_threads=True)
            os._exit(1)

    def _handle(self, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Assign):
            self.assignments.put(msg)
            self._note_generation(msg.gen)
        elif isinstance(msg, protocol.Gen):
            self._note_generation(msg.gen)
        elif isinstance(msg, protocol.Stop):
            if not self.stop_requested:
                log.warning("the agent asks the job to stop (%s): checkpointing at the next "
                            "step every rank agrees on", msg.reason or "no reason given")
            self.stop_requested = True

    def _note_generation(self, gen: int) -> None:
        with self._cond:
            if gen <= self.latest_gen:
                return
            self.latest_gen = gen
            self._cond.notify_all()
            if not gen > self.active_gen >= 0:
                return
            if self._abort_due is None:
                self._abort_due = time.monotonic() + self.abort_grace
        self._abort_when_due()

    def _abort_when_due(self) -> None:
        with self._cond:
            due = self._abort_due
            if due is None or time.monotonic() < due:
                return
            self._abort_due = None
            if not self.latest_gen > self.active_gen >= 0:
                return
            gen = self.latest_gen
            if self._aborted_at is None:
                self._aborted_at = time.monotonic()
        self.on_new_generation(gen)

    def activate(self, gen: int) -> None:
        """This rank now works in generation ``gen`` (the agent learns it is not stuck)."""
        with self._cond:
            self.active_gen = gen
            self.latest_gen = max(self.latest_gen, gen)
            self._aborted_at = None
            self._abort_due = None
            self._reaborted = False
        self.channel.send(protocol.Unwound(gen=gen))

    def unwound(self) -> None:
        """The main thread reached recovery: no abort is due, the watchdog stands down, and
        the agent learns that this rank is not stuck."""
        with self._cond:
            self._aborted_at = None
            self._abort_due = None
            self._reaborted = False
            gen = self.latest_gen
        self.channel.send(protocol.Unwound(gen=gen))

    def progress(self, step: int) -> None:
        """The training loop finished step ``step`` (call it from the loop, after every
        step: the agent's hang detection waits for it)."""
        self.channel.send(protocol.Step(step=int(step)))

    def pause(self, reason: str = "") -> None:
        """The loop leaves the step loop for work of unknown length (validation, a
        synchronous checkpoint, the end of training): the agent allows the initial
        timeout until the next :meth:`progress`."""
        self.channel.send(protocol.Pause(reason=reason))

    def interrupt_pending(self) -> bool:
        """True once a generation newer than the active one was announced. No lock: it is
        read at every module boundary, and both counters only grow."""
        active = self.active_gen
        return active >= 0 and self.latest_gen > active

    def while_stale(self, gen: int, action: Callable[[], Any]) -> Any:
        """Run ``action`` only while this rank is still active in a generation older than
        ``gen``, under the lock that :meth:`activate` takes: what it interrupts cannot be
        generation ``gen``'s own rendezvous (that starts after activating it). None when
        the rank has moved on."""
        with self._cond:
            if not gen > self.active_gen >= 0:
                return None
            return action()

    def superseded(self) -> bool:
        """True when a newer generation than the active one was announced."""
        with self._cond:
            return self.latest_gen > self.active_gen

    def wait_newer(self, than: int, timeout: float) -> Optional[int]:
        """Block until a generation newer than ``than`` is announced; None on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.latest_gen <= than and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self.latest_gen if self.latest_gen > than else None

    def exit_device_error(self, reason: str) -> "NoReturn":
        """This rank's CUDA context is poisoned (an illegal address, an Xid-class fault):
        tell the agent, which probes the GPU before it hands the rank on, and exit with
        ``EXIT_DEVICE_ERROR`` (nothing more can run on this device in this process)."""
        log.error("device error, leaving the GPU to the agent's health probe: %s", reason)
        logging.shutdown()
        self.channel.send(protocol.DeviceError(reason=reason))
        os._exit(protocol.EXIT_DEVICE_ERROR)

    def wait_assign(self, timeout: Optional[float] = None) -> protocol.Assign:
        """A warm spare: block until the agent hands it a rank."""
        return self.assignments.get(timeout=timeout)

    def wait_assignment(self, timeout: Optional[float] = None) -> dict[str, Any]:
        """:meth:`wait_assign` in the wire form (``msg["rank"]``, ``msg.get("node_rank")``)."""
        return protocol.encode(self.wait_assign(timeout))

    def send(self, message: "protocol.Message | dict[str, Any]") -> None:
        self.channel.send(message)


class ReportProgress:
    """Step hook: tell the agent each completed step (it judges hangs by progress)."""

    def __init__(self, link: AgentLink) -> None:
        self.link = link

    def on_phase(self, phase: Phase, step: int) -> None:
        if phase is Phase.AFTER_STEP:
            self.link.progress(step)
