"""One rank's Megatron-Bridge training behind the recovery core's ``StepDriver`` surface.

Bridge builds everything (:meth:`BridgeStepDriver.build`: Bridge's own ``setup()``: parallel
state, model provider, DDP, optimizer, scheduler, datasets and iterators, checkpoint
manager, timers) and Bridge's own ``train()`` runs the iterations (``bridge/loop.py`` runs
it as a coroutine, one committed step per ``train_step``), so logging, validation,
checkpoint saving, timers and callbacks stay Bridge's decisions. The driver takes part in
each iteration through Bridge's step function, which it replaces by :meth:`_bridge_step`:
Bridge's ``train_step`` itself, around which it

* opens the step (``data`` phase; the forward step fires ``forward``/``backward``),
* wraps ``finalize_model_grads`` (``grad_sync``),
* holds the optimizer's ``step()`` right before its update (``compat/megatron_step.py``),
  reduces the loss and batch digest, passes the commit barrier (``optimizer``), commits
  (:meth:`commit`: update, LR schedule, counters, metrics row), re-gathers parameters
  (``param_sync``), lets Bridge's ``train_step`` finish (its scheduler call is a no-op:
  the commit stepped it), and closes the step (``after_step``).

After a failure Bridge's ``train()`` is started again from the committed step with its
counters, data iterators (rebuilt at the committed samples), parameters and loop state
made as a fresh start finds them (:meth:`_enter_bridge_loop`).

Its state (``steps.StepDriver``'s ``state_dict``): the step, the data position
(``state.DataPosition``), the scheduler, Bridge's ``train_state`` counters and the last
metrics row; the optimizer shard travels beside it (``state.OptimizerShard``). Between
steps Bridge's validation, test evaluation and checkpoint saves take as long as they take:
before each, the driver tells the agent (``pause``), whose hang detection then allows the
initial timeout until the next step. A stop every rank agreed on (``stop_after``) gets
Bridge's own checkpoint of its step once Bridge's loop is done with it (``bridge/stop.py``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .. import cpu
from ..compat import bridge as cbridge
from ..compat import megatron_step as cstep
from ..compat.megatron import local_all_gather_object
from ..megatron import optimizer as mopt
from ..megatron import parallel
from ..megatron.shards import make_state_contiguous
from ..metrics.writer import JsonlWriter, write_json
from ..state import DataPosition
from ..steps import HookList, Phase
from ..timeouts import Timeouts
from ..train.loop import PendingCommit, StepMetrics
from .loop import BridgeLoop
from .steps import (RecordingForwardStep, first_lr, global_batch, job_batch_hash, job_loss,
                    lm_loss, logged_grad_norm, summarize)

log = logging.getLogger(__name__)

_TRAIN_STATE = ("consumed_valid_samples", "skipped_train_samples",
                "floating_point_operations_so_far")


class _CommittedScheduler:
    """Bridge's ``train_step`` steps the scheduler after the update; the commit did."""

    def __init__(self, scheduler: Any) -> None:
        self._scheduler = scheduler

    def step(self, increment: int) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)


class BridgeStepDriver:
    """Bridge's objects and loop for one rank (see the module docstring)."""

    def __init__(self, cfg: Any, forward: RecordingForwardStep, hooks: HookList,
                 run_dir: Path, timeouts: Timeouts,
                 pause: Callable[[str], None] = lambda reason: None,
                 callbacks: Any = None,
                 stop_after: Callable[[], Optional[int]] = lambda: None) -> None:
        self.cfg = cfg
        self.forward = forward
        self.hooks = hooks
        forward.hooks = hooks
        self.run_dir = Path(run_dir)
        self.timeouts = timeouts
        self.pause = pause
        self.callbacks = callbacks
        self.stop_after = stop_after  # the step every rank agreed to stop after, if any
        self.step = 0
        self.position = DataPosition()
        self.coords: Optional[parallel.Coordinates] = None
        self.pending: Optional[PendingCommit] = None
        self.last_record: Optional[dict[str, Any]] = None
        self.metrics: Optional[JsonlWriter] = None
        self._loop: Optional[BridgeLoop] = None
        self._last_metrics: Optional[StepMetrics] = None
        self._bridge_train_step: Optional[Callable[..., Any]] = None
        self._update = False

    # ------------------------------------------------------------------ set-up
    def build(self) -> "BridgeStepDriver":
        """Bridge's ``setup()`` in the world that exists now (the fake one, see run.py)."""
        from megatron.bridge.data.utils import get_dataset_provider
        from megatron.bridge.training.callbacks import CallbackManager, normalize_callbacks
        from megatron.bridge.training.config import runtime_config_update
        from megatron.bridge.training.setup import setup
        from megatron.bridge.training.state import GlobalState
        from megatron.core.utils import get_model_config

        cfg = self.cfg
        _refuse_checkpoint_load(cfg)
        # gloo side groups cannot form in the fake world Bridge builds in (only
        # checkpoint formats that gather over gloo use them)
        cfg.dist.use_gloo_process_groups = False
        runtime_config_update(cfg)
        self.state = GlobalState()
        self.state.cfg = cfg
        self.callbacks = normalize_callbacks(self.callbacks) or CallbackManager()
        for event in ("on_eval_start", "on_test_start"):  # work of unknown length
            self.callbacks.register(event, lambda context, e=event: self.pause(f"bridge {e}"))
        cbridge.before_checkpoint_saves(lambda: self.pause("bridge checkpoint save"))
        self.datasets = _CachedDatasets(get_dataset_provider(cfg.dataset))
        with local_all_gather_object():  # the param-group key gather, answered locally
            out = setup(self.state, self.datasets.provider, callback_manager=self.callbacks)
        self.model, self.optimizer, self.scheduler = out.model, out.optimizer, out.scheduler
        self.checkpoint_manager, self.pg_collection = out.checkpoint_manager, out.pg_collection
        self.state = out.state
        make_state_contiguous(self.optimizer)  # Adam's state up front, in one byte range
        model_config = get_model_config(self.model[0])
        self._model_config = model_config
        self._param_sync_func = model_config.param_sync_func
        finalize = model_config.finalize_model_grads_func

        def finalize_with_phase(*args: Any, **kwargs: Any) -> Any:
            self.hooks(Phase.GRAD_SYNC, self.step + 1)
            return finalize(*args, **kwargs)

        model_config.finalize_model_grads_func = finalize_with_phase
        self._bridge_train_step = cbridge.replace_train_step(self._bridge_step)
        self.coords = parallel.coordinates()
        self.step = int(self.state.train_state.step)
        self.position.consumed_samples = int(self.state.train_state.consumed_train_samples)
        return self

    @property
    def consumed_samples(self) -> int:
        return self.position.consumed_samples

    # ------------------------------------------------------------------ StepDriver
    def rebuild_parallel(self) -> None:
        """megatron's parallel state with Bridge's arguments, in the job's world."""
        import math

        import torch.distributed as dist

        # the job's collective bound (on gloo a pipeline recv from a dead peer ends only there)
        bound = self.timeouts.pg(dist.get_backend()).total_seconds()
        cbridge.initialize_parallel_state(self.cfg, timeout_minutes=max(1, math.ceil(bound / 60)))
        self.coords = parallel.coordinates()
        if self.metrics is None:
            self.metrics = JsonlWriter(self.run_dir / "metrics.jsonl",
                                       enabled=dist.get_rank() == 0)

    def rebind_roots(self) -> list[Any]:
        modules = [m for chunk in self.model for m in chunk.modules()]
        return [*modules, self.optimizer, self.scheduler, self.pg_collection, self.state,
                self.checkpoint_manager, self.cfg]

    def reset_step_marks(self) -> None:
        self.forward.reset_marks()

    def state_dict(self) -> dict[str, Any]:
        """Counters, data position, schedule and last record (not the optimizer shard)."""
        ts = self.state.train_state
        return {"step": self.step, "data": self.position.state_dict(),
                "schedule": self.scheduler.state_dict(),
                "train_state": {k: getattr(ts, k) for k in _TRAIN_STATE},
                "record": self.last_record}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.position.load_state_dict(state["data"])
        self.scheduler.num_steps = 0  # its load steps by the saved count
        self.scheduler.load_state_dict(state["schedule"])
        for key, value in state["train_state"].items():
            setattr(self.state.train_state, key, value)
        self.last_record = state["record"]

    def train_step(self) -> StepMetrics:
        """Let Bridge's loop run step ``step + 1`` and what it does after it."""
        target = self.step + 1
        if self._loop is None or not self._loop.alive:
            self._loop = BridgeLoop(self._run_bridge_loop, self._prepare_thread)
        try:
            self._loop.advance(target)
        except BaseException:
            self._loop = None
            raise
        if self.step < target:
            raise RuntimeError(f"Bridge's training loop ended at iteration {self.step} before "
                               f"train.train_iters={self.cfg.train.train_iters} (its exit "
                               "conditions: train.exit_interval, exit_duration_in_mins, ...)")
        agreed = self.stop_after()
        if agreed is not None and self.step >= agreed:  # Bridge's checkpoint for the stop
            from .stop import save_for_stop

            save_for_stop(self)
        assert self._last_metrics is not None
        return self._last_metrics

    def commit(self) -> StepMetrics:
        """Local only: the held update, LR schedule, counters, metrics row."""
        pending = self.pending
        assert pending is not None and pending.step == self.step + 1
        if not pending.prepared.found_inf:
            with cstep.no_timer_barriers(self.optimizer):
                mopt.apply_update(self.optimizer)
            self.scheduler.step(increment=self._batch)
        self.position.advance(self._batch)
        self.step = pending.step
        self.pending = None
        metrics = StepMetrics(step=pending.step, loss=pending.loss,
                              consumed_samples=self.consumed_samples,
                              step_time_s=time.perf_counter() - pending.start,
                              grad_norm=pending.prepared.grad_norm, lr=first_lr(self.optimizer),
                              batch_hash=pending.batch_hash)
        self.last_record = metrics.record()
        assert self.metrics is not None
        self.metrics.write(self.last_record)
        self._last_metrics = metrics
        return metrics

    def finish(self) -> dict[str, Any]:
        import torch.distributed as dist

        summary = summarize(self.model, self.optimizer, self.step, self.consumed_samples)
        if dist.get_rank() == 0:
            write_json(self.run_dir / "summary.json", summary)
        if self.metrics is not None:
            self.metrics.close()
        return summary

    # ------------------------------------------------------------------ Bridge's loop
    @property
    def _batch(self) -> int:
        return global_batch(self.state)

    def _prepare_thread(self) -> None:
        """Per-thread state of the loop thread: CPU rehearsal mode, the CUDA device."""
        from .. import device

        cpu.enable()
        if device.is_cuda():
            torch.cuda.set_device(device.current())

    def _run_bridge_loop(self) -> None:
        """Bridge's ``train()``, then what Bridge's ``pretrain()`` does after it."""
        from megatron.bridge.training.eval import evaluate_and_print_results
        from megatron.bridge.training.train import train

        self._enter_bridge_loop()
        train(self.forward, self.model, self.optimizer, self.scheduler, self.train_iterator,
              self.valid_iterator, self.state, self.checkpoint_manager, self.pg_collection,
              callback_manager=self.callbacks)
        cfg, ts = self.cfg, self.state.train_state
        for iterator, name, wanted in ((self.valid_iterator, "validation", ts.do_valid),
                                       (self.test_iterator, "test", ts.do_test)):
            if wanted:
                evaluate_and_print_results(
                    self.state, f"iteration {ts.step} on {name} set", self.forward, iterator,
                    self.model, cfg.model, verbose=True,
                    write_to_tensorboard=not cfg.validation.skip_train,
                    callback_manager=self.callbacks, **({"is_test": True} if name == "test"
                                                        else {}))
        self.checkpoint_manager.finalize_async_saves(state=self.state, blocking=True,
                                                     terminate=True)

    def _enter_bridge_loop(self) -> None:
        """Make the state Bridge's ``train()`` starts from what a fresh start gives it, at
        the committed step (collective: every rank enters together)."""
        from megatron.bridge.data.loaders import setup_data_iterators

        ts = self.state.train_state
        ts.step, ts.consumed_train_samples = self.step, self.consumed_samples
        cbridge.reset_loop_state(self.state)
        cstep.discard_in_flight(self.model)
        cstep.resync_params(self.model)
        cstep.ensure_forward_pre_hooks(self.model)
        self._model_config.param_sync_func = self._param_sync_func
        self.forward.end()
        eval_pgs = getattr(self.state, "_eval_pgs", None)
        self.train_iterator, self.valid_iterator, self.test_iterator = setup_data_iterators(
            cfg=self.cfg, train_state=ts, model_length=len(self.model),
            train_valid_test_datasets_provider=self.datasets.cached,
            dp_group=self.pg_collection.dp,
            eval_dp_group=eval_pgs.dp if eval_pgs is not None else None)

    def _bridge_step(self, forward_step_func: Any, data_iterator: Any, model: Any,
                     optimizer: Any, scheduler: Any, global_state: Any, pg_collection: Any,
                     forward_backward_func: Any, p2p_communicator: Any) -> Any:
        """Bridge's ``train_step`` with the step's phases and commit around it."""
        step = self.step + 1
        assert self._loop is not None
        self._loop.gate(step)
        if int(global_state.train_state.step) != self.step:
            raise RuntimeError(f"Bridge's loop is at iteration {global_state.train_state.step}, "
                               f"the committed step is {self.step}")
        start = time.perf_counter()
        self.hooks(Phase.DATA, step)
        self.forward.begin(step)
        losses: list[Any] = []

        def forward_backward(**kwargs: Any) -> Any:
            out = forward_backward_func(**kwargs)
            losses[:] = out or []
            return out

        real_step = optimizer.step

        def held_step() -> Any:
            with cstep.deferred_update(optimizer) as held:
                result = real_step()
            loss = job_loss(lm_loss(losses, pg_collection.dp_cp))
            batch_hash = job_batch_hash(self.forward.micro_batches)
            prepared = mopt.StepResult(found_inf=not held.update,
                                       grad_norm=logged_grad_norm(held.grad_norm))
            self.pending = PendingCommit(step, prepared, loss, start, batch_hash)
            self.hooks(Phase.OPTIMIZER, step)
            self.commit()
            self.hooks(Phase.PARAM_SYNC, step)
            mopt.gather_params(self.model, optimizer)
            return result

        optimizer.step = held_step
        try:
            result = self._bridge_train_step(
                forward_step_func, data_iterator, model, optimizer,
                _CommittedScheduler(scheduler), global_state, pg_collection,
                forward_backward, p2p_communicator)
        finally:
            optimizer.__dict__.pop("step", None)
            self.forward.end()
        if self.step != step:  # Bridge's rerun machinery asked to exit before the update
            raise RuntimeError(f"Bridge's train_step returned without committing step {step}")
        self.hooks(Phase.AFTER_STEP, step)
        return result


class _CachedDatasets:
    """Bridge's dataset provider, building the datasets once: rebuilding the iterators
    after a failure reuses them (no file I/O, no dataset-builder barriers)."""

    def __init__(self, provider: Callable[..., Any]) -> None:
        import functools

        self.inner = provider
        self.datasets: Optional[tuple[Any, Any, Any]] = None

        @functools.wraps(provider)
        def build(*args: Any, **kwargs: Any) -> Any:
            self.datasets = provider(*args, **kwargs)
            return self.datasets

        self.provider = build

    def cached(self, *args: Any, **kwargs: Any) -> Any:
        assert self.datasets is not None, "datasets are built by Bridge's setup first"
        return self.datasets


def _refuse_checkpoint_load(cfg: Any) -> None:
    """Under ncl-launch set-up happens in a fake world, where Bridge cannot load a
    checkpoint: refuse one, except Bridge's own save directory (the recipes' default
    ``load = save``) while the core's durable checkpoints are on: a new job of the chain
    resumes from the core's checkpoint of the same run (a stop writes both), so Bridge's
    set-up is told not to load (``checkpoint.load`` becomes None)."""
    from megatron.bridge.training.utils.checkpoint_utils import checkpoint_exists

    from ..checkpoint.config import enabled
    from ..config import ConfigError
    from .apply import checkpointless_of

    load, save = getattr(cfg.checkpoint, "load", None), getattr(cfg.checkpoint, "save", None)
    if load and save and Path(load).resolve() == Path(save).resolve() and \
            enabled(checkpointless_of(cfg).checkpoint, under_agent=True):
        if checkpoint_exists(load):
            log.info("checkpoint.load=%s is Bridge's own save directory: under ncl-launch a "
                     "new job resumes from the core's durable checkpoint "
                     "(checkpointless.checkpoint.resume), not from Bridge's", load)
        cfg.checkpoint.load = None
    for key in ("load", "pretrained_checkpoint"):
        path = getattr(cfg.checkpoint, key, None)
        if path and checkpoint_exists(path):
            raise ConfigError(
                f"checkpoint.{key}={path} holds a checkpoint: under ncl-launch the job starts "
                "from its recipe's initial state, or from the core's durable checkpoint of "
                "the same run directory, and recovers from peers. Resume a Bridge "
                f"checkpoint with Bridge's own launch (torchrun), or set checkpoint.{key}=null.")
