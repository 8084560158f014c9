"""One rank's checkpointless recovery inside Lightning's ``fit`` (NeMo 2 under ncl-launch).

Lightning stays in charge of the loop: every hook, logger call, validation and
checkpoint runs from Lightning's own code, once per step. A failure is caught where it
surfaces, at a *recovery point*, recovered from there (abort, new world, agreement,
state transfer: the core's :class:`~nemo_checkpointless.recovery.generation.RecoveryLoop`)
and the point is run again; Lightning never sees it. The recovery points, in the order
an iteration meets them:

* the step (the optimizer's ``step(closure)``: training step, gradient reduction, the
  split update with its commit barrier, the parameter all-gather). Redone from the same
  micro-batches if no rank passed the commit barrier, rolled forward otherwise;
* a validation run (``val_check_interval``), run again from its first batch;
* a checkpoint save (the strategy's ``save_checkpoint``), run again;
* every other collective a hook makes (``torch.distributed.barrier`` around NeMo's
  checkpoint markers, Lightning's object broadcasts), run again on the new groups.

Each point has a position (iteration, index). After a recovery every rank reports its
position and the job meets at the furthest one. A replacement rank restores Lightning's
state from the start of that iteration (from a peer's :class:`~.journal.Journal`), then
re-runs the iteration's hooks itself, *catching up*: points before the meeting one are
skipped (the step is replayed from the peer's record, a validation's outcome is taken
from the peer), so its callbacks end in the state its peers' are in. A survivor that
fell one point behind where a collective with a result completed elsewhere cannot catch
up and leaves, to be replaced (a rare race; barriers and saves simply count as done).

This module holds the session's life (open, attach, close), its iteration marks and the
recovery points' mechanism (:meth:`CheckpointlessSession.section`) with the points other
than the step; the step is ``step.py`` (:class:`~.step.StepPoint`), the meeting and the
catch-up ``meeting.py`` (:class:`~.meeting.Meeting`), a stop on request ``stop.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch

from .. import runtime
from ..comm.world import fake_world
from ..compat import collectives, lightning_fit
from ..config import RunConfig
from ..launch.channel import Channel
from ..megatron.rebind import group_roles, groups_by_role
from ..recovery.failures import Fatal
from ..recovery.generation import RecoveryLoop
from ..steps import HookList
from .driver import NemoStepDriver
from .journal import Journal, StepEntry
from .loggers import LoggerGuard
from .meeting import Meeting, Position
from .parallel import ParallelLayout
from .step import StepPoint
from .stop import StopRequest, checkpoint_and_leave

log = logging.getLogger(__name__)

T = TypeVar("T")
PRESTART = -1  # a replacement between its attach and Lightning's on_train_start

_current: Optional["CheckpointlessSession"] = None


def current() -> Optional["CheckpointlessSession"]:
    """This process's session (opened by the runner before the recipe is built)."""
    return _current


class CheckpointlessSession(StepPoint, Meeting):
    """A rank's recovery loop, recovery points and catch-up (module docstring)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, channel: Channel) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.channel = channel
        self.loop: Optional[RecoveryLoop] = None
        self.summary: Optional[dict[str, Any]] = None
        self.layout = ParallelLayout(cfg.strategy.backend)
        self.journal = Journal()
        self.trainer: Any = None
        self.driver: Optional[NemoStepDriver] = None
        self.loggers: Optional[LoggerGuard] = None
        self.iteration = PRESTART
        self.index = 0
        self.depth = 0
        self.attached = False
        self.new = False  # a replacement that has not met its peers yet
        self.catch_up: Optional[Position] = None
        self.micro: list[dict[str, torch.Tensor]] = []
        self._forward_mark = 0
        self._ran: set[int] = set()  # steps whose training step ran in this process
        self._replay: Optional[StepEntry] = None
        self._data_step = -1
        self._drawn: list[Any] = []
        self._roles: dict[int, str] = {}  # id(group) -> role, for groups of aborted worlds
        self._swap: Optional[dict[int, Any]] = None  # stale handle -> current group
        self._in_core = False  # inside a call of the recovery loop
        self._resultless = False
        self._behind_done = False
        self._pos_override: Optional[Callable[[Position], Position]] = None
        self._pending_metrics: Optional[dict[str, Any]] = None
        self._init_global_step: Optional[int] = None
        self.stop = StopRequest()  # a stop every rank agreed on (nemo/stop.py)

    # ------------------------------------------------------------------ start, end
    @classmethod
    def open(cls, cfg: RunConfig, run_dir: Path, channel: Channel) -> "CheckpointlessSession":
        """Before the recipe is built: a warm spare waits here for its rank; a first start
        joins the job's world (NeMo then builds in it); a replacement builds in a world of
        fake groups and joins at :meth:`attach`."""
        global _current
        session = cls(cfg, run_dir, channel)
        loop = session.loop = runtime.open_recovery(cfg, run_dir, channel)
        session.new = loop.replacement
        if session.new:
            fake_world(loop.rank, loop.world_size)
        else:
            session._guarded(loop.join)
        collectives.install(session._collective)
        _current = session
        return session

    @property
    def hooks(self) -> HookList:
        assert self.loop is not None
        return self.loop.step_hooks

    @property
    def rank(self) -> int:
        assert self.loop is not None
        return self.loop.rank

    def close(self) -> None:
        """Training ended on this rank: tell the agent, release the world."""
        global _current
        assert self.loop is not None
        summary = self.summary or {"final_step": self.driver.step if self.driver else 0}
        runtime.end_recovery(self.loop, self.channel, summary)
        _current = None
        try:
            from ..comm import destroy_world
            destroy_world()
        except Exception:  # noqa: BLE001 - groups may already be aborted
            pass

    def _guarded(self, call: Callable[[], T]) -> T:
        """``call()``; an outcome for the whole job (a verdict every rank reaches alike, a
        stop every rank agreed on) ends the process as the agent expects; anything else
        raised goes on up (to Lightning, then ``strategy.on_exception``). The core's own
        collectives meanwhile use the groups it passes (see :meth:`_current_groups`)."""
        self._in_core = True
        try:
            return call()
        except BaseException as err:  # noqa: BLE001 - re-raised unless job-wide
            runtime.leave_on(err, self.channel)
            raise
        finally:
            self._in_core = False
            self._swap = None  # worked out again, in the world the call left

    # ------------------------------------------------------------------ attach
    def attach(self, trainer: Any) -> None:
        """Hand NeMo's built objects to the recovery loop and meet the peers. A replacement
        does it at ``on_fit_start`` (it must stand where its peers are before Lightning
        sets up its data); a first start at ``on_train_start`` (after a checkpoint
        resume restored Lightning's state)."""
        assert self.loop is not None
        loop = self.loop
        lightning_fit.check(trainer)
        self.trainer = trainer
        driver = self.driver = NemoStepDriver(trainer, self.hooks, self.layout, self.run_dir)
        driver.on_commit = self._committed
        self.loggers = LoggerGuard(trainer, self.journal, lambda: self.iteration)
        self.loggers.install()
        lightning_fit.wrap_validation(trainer, self.validation)
        self.depth += 1
        try:
            self._guarded(lambda: self._settle(driver))
            self._meet_retrying(None)
        finally:
            self.depth -= 1
        self.attached = True
        self.new = False

    def _settle(self, driver: NemoStepDriver) -> None:
        assert self.loop is not None
        self.loop.attach(driver)
        if self.new and self.loop.fresh_start:
            # its peers are gone too: Lightning's state, the data position and the logs
            # would start over while the job's record goes on
            raise Fatal("every rank of the job lost its state at once: nothing to recover "
                        "from in process; start the job again (NeMo's AutoResume resumes "
                        "from its last checkpoint)")

    def training_starts(self) -> None:
        """Lightning's ``on_train_start`` (after its sanity check): iteration 0 begins."""
        trainer = self.trainer
        if self._pending_metrics is not None:  # a replacement: metrics of its peers
            lightning_fit.set_callback_metrics(trainer, self._pending_metrics)
            self._pending_metrics = None
        if self._init_global_step is not None:
            # the data position is the committed step's: NeMo counts consumed samples (its
            # log, the data module's checkpoint state) from the step its loader was made at
            trainer.strategy.data_sampler.init_global_step = self._init_global_step
            if hasattr(trainer.datamodule, "init_global_step"):
                trainer.datamodule.init_global_step = self._init_global_step
            self._init_global_step = None
        self._begin(0)

    def begin_iteration(self) -> None:
        """``on_train_batch_start`` (the first callback): iteration S = global_step + 1;
        or, the job having agreed to stop after step S - 1, its checkpoint and the exit."""
        completed = int(self.trainer.global_step)
        self._begin(completed + 1)
        if self.stop.due(completed):
            checkpoint_and_leave(self, completed)

    def training_ends(self) -> None:
        """``on_train_end``: its recovery points continue the last iteration's (a
        replacement re-runs that iteration, and Lightning then ends training for it)."""
        return None

    def _begin(self, iteration: int) -> None:
        self.iteration = iteration
        self.index = 0
        if self.catch_up is None or self.catch_up[0] != iteration:
            self.journal.begin(iteration, lightning_fit.snapshot(self.trainer))

    # ------------------------------------------------------------------ recovery points
    def section(self, name: str, run: Callable[[int], T], skip: Callable[[], T],
                resultless: bool = False) -> T:
        """Run one recovery point: ``run(attempt)``, again after each recovery; ``skip()``
        instead on a replacement that has not reached the meeting point yet."""
        if self.depth > 0 or not self.attached:
            return run(0)
        pos = (self.iteration, self.index)
        self.index += 1
        self.depth += 1
        hook = lightning_fit.hook_name(self.trainer)
        try:
            if self.catch_up is not None:
                if pos < self.catch_up or self.iteration == PRESTART:
                    return skip()
                log.info("caught up with the job at step %d (%s)", pos[0], name)
                self.catch_up = None
            attempt = 0
            while True:
                try:
                    return run(attempt)
                except BaseException as err:  # noqa: BLE001 - the loop classifies it
                    self._recover(err, pos, resultless)
                    lightning_fit.set_hook_name(self.trainer, hook)
                    if self._behind_done:
                        self._behind_done = False
                        return skip()
                    attempt += 1
        finally:
            self.depth -= 1

    def _recover(self, err: BaseException, pos: Position, resultless: bool) -> None:
        assert self.loop is not None
        loop = self.loop
        self._remember_groups()
        self._guarded(lambda: loop.recover(err))
        self._resultless = resultless
        here = self._pos_override(pos) if self._pos_override is not None else pos
        self._meet_retrying(here)
        self._micro_reset()

    def _remember_groups(self) -> None:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            self._roles.update(group_roles())

    def _meet_retrying(self, pos: Optional[Position]) -> None:
        assert self.loop is not None
        loop = self.loop
        while True:
            try:
                self._meet(pos)
                return
            except BaseException as err:  # noqa: BLE001 - the loop classifies it
                self._remember_groups()
                self._guarded(lambda: loop.recover(err))


    # ------------------------------------------------------------------ other points
    def validation(self, run: Callable[[], Any]) -> Any:
        iteration = self.iteration

        def attempt(n: int) -> Any:
            self._pause("validation")
            out = run()
            if iteration >= 0:
                self.journal.after_validation[iteration] = {
                    "callbacks": [lightning_fit.callback_attributes(cb)
                                  for cb in self.trainer.callbacks],
                    "metrics": lightning_fit.callback_metrics(self.trainer)}
            return out

        def skip() -> Any:
            entry = self.journal.after_validation.get(iteration) if iteration >= 0 else None
            if entry is not None:
                lightning_fit.apply_callback_attributes(self.trainer, entry["callbacks"])
                lightning_fit.set_callback_metrics(self.trainer, entry["metrics"])
            return []

        return self.section("validation", attempt, skip)

    def save_checkpoint(self, save: Callable[[dict], Any], checkpoint: dict) -> Any:
        original = dict(checkpoint)

        def attempt(n: int) -> Any:
            self._pause("checkpoint")
            return save(checkpoint if n == 0 else dict(original))

        return self.section("save_checkpoint", attempt, skip=lambda: None, resultless=True)

    def finish(self) -> dict[str, Any]:
        """``summary.json``: the state hash over every rank, with the recoveries."""
        loop = self.loop
        assert loop is not None
        self.summary = self.section("summary", lambda n: loop.finish(), skip=dict)
        return self.summary

    def _pause(self, reason: str) -> None:
        """Work of unknown length between two steps: the agent's hang watch allows its
        initial timeout until the next step."""
        assert self.loop is not None
        self.loop.link.pause(reason)

    def _collective(self, name: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if self.depth > 0 or not self.attached:  # inside a recovery point, or before any
            a, k = self._current_groups(args, kwargs)
            return fn(*a, **k)
        kept = collectives.inputs(args, kwargs)

        def run(attempt: int) -> Any:
            if attempt:
                collectives.restore_inputs(kept)
            a, k = self._current_groups(args, kwargs)
            return fn(*a, **k)

        return self.section(name, run,
                            skip=lambda: collectives.local_result(name, args, kwargs),
                            resultless=name in collectives.RESULTLESS)

    def _current_groups(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``args``/``kwargs`` with every group handle of an aborted world replaced by the
        current world's group of its role (objects a hook uses may have cached one before
        a recovery: NeMo's checkpoint save strategy keeps the groups it was made with)."""
        if not self._roles or self._in_core:
            return args, kwargs
        if self._swap is None:  # once per generation
            self._swap = collectives.replacements(self._roles, groups_by_role())
        return collectives.regroup(args, kwargs, self._swap)
