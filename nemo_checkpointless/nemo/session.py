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
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch

from .. import device, runtime
from ..comm.world import fake_world
from ..compat import collectives, lightning_fit
from ..config import RunConfig
from ..launch.channel import Channel
from ..megatron.rebind import group_roles, groups_by_role
from ..recovery.failures import Fatal
from ..recovery.generation import RecoveryLoop
from ..steps import HookList, Phase, Stopped
from ..train.loop import finish_step
from .driver import NemoStepDriver, batch_hash
from .journal import Journal, StepEntry, detached
from .loggers import LoggerGuard
from .parallel import ParallelLayout
from .stop import StopRequest, checkpoint_and_leave

log = logging.getLogger(__name__)

T = TypeVar("T")
Position = tuple[int, int]
PRESTART = -1  # a replacement between its attach and Lightning's on_train_start
FRESH, SURVIVOR, NEW = 0, 1, 2
EXIT_BEHIND = 1  # the agent replaces a rank that exits non-zero

_current: Optional["CheckpointlessSession"] = None


def current() -> Optional["CheckpointlessSession"]:
    """This process's session (opened by the runner before the recipe is built)."""
    return _current


class ReplayIterator(Iterator[Any]):
    """The step's micro-batches: those already drawn in an earlier attempt of the same
    step first, then new ones from Lightning's iterator."""

    def __init__(self, source: Iterator[Any], drawn: list[Any]) -> None:
        self.source = source
        self.drawn = drawn
        self.next_index = 0

    def __next__(self) -> Any:
        if self.next_index < len(self.drawn):
            item = self.drawn[self.next_index]
        else:
            item = next(self.source)
            self.drawn.append(item)
        self.next_index += 1
        return item

    def __getattr__(self, name: str) -> Any:  # done / fetched / length of Lightning's
        return getattr(self.source, name)


class CheckpointlessSession:
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

    def _meet(self, pos: Optional[Position]) -> None:
        """Every rank of the new world reports where it stands; the job meets at the
        furthest survivor's point; a replacement gets what it needs to catch up."""
        from megatron.core import parallel_state as ps

        world = torch.distributed.get_world_size()
        kind = NEW if self.new else (SURVIVOR if pos is not None and pos[0] >= 0 else FRESH)
        step, index = pos if pos is not None else (0, 0)
        mine = device.control_tensor([kind, step, index, int(self._resultless),
                                      int(ps.is_pipeline_last_stage())], torch.int64)
        table = device.zeros(world * 5, torch.int64)
        collectives.original("all_gather_into_tensor")(table, mine)
        rows = table.view(world, 5).tolist()
        survivors = [(r, (row[1], row[2]), row[4]) for r, row in enumerate(rows)
                     if row[0] == SURVIVOR]
        newcomers = any(row[0] == NEW for row in rows)
        if not survivors:  # the job is at its start: agree on the loggers' versions
            versions = [lightning_fit.logger_versions(self.trainer)]
            collectives.original("broadcast_object_list")(versions, src=0)
            lightning_fit.set_logger_versions(self.trainer, versions[0])
            return
        meeting = max(p for _, p, _ in survivors)
        if newcomers:
            at_meeting = [(not last, r) for r, p, last in survivors if p == meeting]
            src = min(at_meeting)[1]  # prefer the last pipeline stage: it logs the loss
            box = [self._package(meeting) if self.rank == src else None]
            collectives.original("broadcast_object_list")(box, src=src)
            if kind == NEW:
                self._load(box[0], meeting)
        if kind == SURVIVOR and (step, index) < meeting:
            if self._resultless:
                self._behind_done = True  # it completed elsewhere; nothing to learn from it
            else:
                self._leave(meeting)
        log.info("recovery point: step %d, point %d%s", meeting[0], meeting[1],
                 " (a replacement catches up)" if newcomers else "")

    def _leave(self, meeting: Position) -> None:
        log.error("this rank missed the result of a collective its peers completed (they "
                  "are at step %d, point %d): leaving so that a replacement takes its place",
                  *meeting)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_BEHIND)

    def _package(self, meeting: Position) -> dict[str, Any]:
        package = self.journal.package(meeting[0])
        package["versions"] = lightning_fit.logger_versions(self.trainer)
        package["stop_after"] = self.stop.step
        return package

    def _load(self, package: dict[str, Any], meeting: Position) -> None:
        """A replacement: stand where Lightning stood at the start of the meeting's
        iteration, data after the committed step, and write the rows rank 0 lost."""
        trainer, driver = self.trainer, self.driver
        assert driver is not None and self.loggers is not None
        self.catch_up = meeting
        self.journal.adopt(package, meeting[0])
        self.stop.agreed(package.get("stop_after"))
        snapshot = package.get("snapshot")
        if snapshot is not None:
            lightning_fit.restore(trainer, snapshot)
            self._pending_metrics = snapshot["callback_metrics"]
        lightning_fit.set_logger_versions(trainer, package["versions"])
        sampler = trainer.strategy.data_sampler
        sampler.init_consumed_samples = driver.consumed_samples
        sampler.prev_consumed_samples = driver.consumed_samples
        sampler.if_first_step = 1
        self._init_global_step = driver.step
        if trainer.global_rank == 0:
            self.loggers.read_existing()
            rows = self.loggers.replay(package.get("rows", {}))
            if rows:
                log.warning("wrote %d logger rows the previous rank 0 had not", rows)
        log.warning("replacement: catching up with the job at step %d, point %d "
                    "(committed step %d)", meeting[0], meeting[1], driver.step)

    # ------------------------------------------------------------------ the step
    def compute(self, closure: Callable[[], Any]) -> tuple[Any, Optional[float], None]:
        """The optimizer's ``step(closure)``: the whole step as one recovery point."""
        driver = self.driver
        assert driver is not None
        step = int(self.trainer.global_step) + 1
        inner, after = lightning_fit.split_closure(closure)
        state: dict[str, Any] = {"after": False, "loss": None, "metrics": None}

        def hooks_after_closure() -> None:
            if not state["after"]:
                state["after"] = True
                after()

        def run(attempt: int) -> tuple[Any, Optional[float], None]:
            if driver.step < step:
                self._micro_reset()
                self.hooks(Phase.DATA, step)
                start = time.perf_counter()
                state["loss"] = inner()
                hooks_after_closure()
                loss = lightning_fit.closure_loss(self.journal.step(step).output)
                state["metrics"] = finish_step(driver, step, loss, start,
                                               batch_hash(self.micro), driver.clip_grad)
            elif step not in self._ran:  # a replacement: its peers computed this step
                self._replay = self.journal.steps.get(step)
                if self._replay is None:
                    raise RuntimeError(f"no record of step {step} to catch up from")
                try:
                    state["loss"] = inner()
                finally:
                    self._replay = None
                hooks_after_closure()
            entry = self.journal.step(step)
            return state["loss"], entry.grad_norm, None

        self._pos_override = lambda p: (p[0], p[1] + 1) if driver.step >= step else p
        try:
            result = self.section("step", run, skip=lambda: run(0))
        finally:
            self._pos_override = None
        loop = self.loop
        assert loop is not None
        if state["metrics"] is not None:  # computed here (not replayed, not rolled forward)
            self._guarded(lambda: self._step_done(loop, state["metrics"]))
        return result

    def _step_done(self, loop: RecoveryLoop, metrics: Any) -> None:
        try:
            loop.step_done(metrics)
        except Stopped as stop:  # agreed at this step's barrier: leave after its iteration
            self.stop.agreed(stop.step)

    def training_step(self, run: Callable[[Iterator[Any]], Any],
                      dataloader_iter: Iterator[Any]) -> Any:
        """The strategy's ``training_step``: the same micro-batches in every attempt of a
        step; a replay logs what the peer's step logged and returns its output."""
        module = self.trainer.lightning_module
        step = int(self.trainer.global_step) + 1
        if self._replay is not None:
            for name, value, kwargs in self._replay.logs:
                module.log(name, value, **kwargs)
            return self._replay.output
        if self._data_step != step:
            self._data_step, self._drawn = step, []
        entry = StepEntry()
        with lightning_fit.recording_logs(module, entry.logs):
            out = run(ReplayIterator(dataloader_iter, self._drawn))
        entry.output = detached(out)
        self.journal.steps[step] = entry
        self._ran.add(step)
        return out

    def _committed(self, step: int, metrics: Any, prepared: Any) -> None:
        entry = self.journal.step(step)
        entry.grad_norm = None if prepared.found_inf else float(prepared.grad_norm)
        record = metrics.record()
        record.pop("lr", None)
        record.pop("time", None)
        entry.record = record

    def on_microbatch(self, batch: Any) -> None:
        """NeMo's Megatron-step event, once per micro-batch: the digest and ``forward``."""
        tokens = batch.get("tokens") if isinstance(batch, dict) else None
        if tokens is not None:
            self.micro.append({"tokens": tokens})
        step = int(self.trainer.global_step) + 1
        if self._forward_mark != step:
            self._forward_mark = step
            self.hooks(Phase.FORWARD, step)

    def _micro_reset(self) -> None:
        self.micro = []
        self._forward_mark = 0

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
