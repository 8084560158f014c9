"""In-process recovery of a NeMo 2 / Lightning job: the recovery manager drives the steps.

Under ``ncl-launch`` with tier 3/4, ``recipes/nemo_pretrain.py`` runs the recipe through
:func:`run_recipe_under_agent`:

1. NeMo and Lightning build everything as usual (``llm.pretrain`` -> ``trainer.fit``:
   strategy, megatron parallel state, ``LlamaModel`` in ``MegatronParallel``, megatron's
   DDP and DistributedOptimizer, LR scheduler, data module), but inside a world of *fake*
   process groups (``torch.distributed``'s ``fake`` backend: collectives are no-ops). So a
   replacement rank builds its skeleton alone while its peers keep theirs, and a first
   start and a replacement take the same path.
2. Lightning's fit loop is replaced (:func:`_driven_run`): after Lightning's own set-up
   (``setup_data``, ``on_train_start``) it hands a :class:`NemoStepDriver` to
   :meth:`RecoveryManager.run`, which forgets the fake groups, joins the job's world,
   rebuilds megatron's parallel state, rebinds every cached group handle and from then on
   runs step after step, recovering in process exactly as for the lean loop.
3. :class:`NemoStepDriver` runs one step with NeMo's objects: ``MegatronParallel``'s
   forward-backward (NeMo's data step, forward step, loss reduction and Megatron-step
   callbacks) and megatron's optimizer split at the commit point, the LR scheduler that
   NeMo configured for Lightning, and data from the data module positioned by
   ``consumed_samples`` (NeMo's ``MegatronDataSampler``).

Lightning's logging (``self.log``) is off in a driven job: ``metrics.jsonl`` (the lean
loop's schema, one row per committed step) and ``summary.json`` are the record.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from ..comm.world import fake_world
from ..config import (CheckpointlessConfig, DataConfig, FaultConfig, ModelConfig, RunConfig,
                      StrategyConfig, TrainerConfig)
from ..megatron import optimizer as mopt
from ..megatron import parallel
from ..megatron.shards import make_state_contiguous
from ..megatron.state import job_digest
from ..metrics.writer import JsonlWriter, write_json
from ..train.data import local_batch_digest
from ..steps import HookList, Phase
from ..train.loop import PendingCommit, StepMetrics, finish_step

log = logging.getLogger(__name__)


class NemoStepDriver:
    """One rank's NeMo/Lightning objects behind the core's ``StepDriver`` surface."""

    def __init__(self, trainer: Any, hooks: HookList, strategy_cfg: StrategyConfig,
                 run_dir: Path) -> None:
        self.trainer = trainer
        self.hooks = hooks
        self.strategy_cfg = strategy_cfg
        self.run_dir = Path(run_dir)
        strategy = trainer.strategy
        self.wrapper = trainer.optimizers[0]  # CheckpointlessMcoreOptimizer
        self.optimizer = self.wrapper.mcore_optimizer
        self.model: list[torch.nn.Module] = list(self.wrapper.model_chunks)
        self.scheduler = trainer.lr_scheduler_configs[0].scheduler \
            if trainer.lr_scheduler_configs else None
        self.sampler = strategy.data_sampler
        self.coords: Optional[parallel.Coordinates] = parallel.coordinates()
        self.consumed_samples = 0
        self.pending: Optional[PendingCommit] = None
        self.last_record: Optional[dict[str, Any]] = None
        self.metrics: Optional[JsonlWriter] = None
        self._step = 0
        self._data: Optional[Iterator[Any]] = None
        self._data_at = -1  # consumed_samples the iterator is positioned at
        self._micro: list[dict[str, torch.Tensor]] = []
        self._forward_step = 0
        self.clip_grad = float(getattr(self.optimizer.config, "clip_grad", 0.0) or 0.0)
        strategy.model.callbacks.add(self)  # on_megatron_microbatch_start below
        make_state_contiguous(self.optimizer)  # one byte range for the peer transfer
        log.info("the recovery manager drives NeMo's steps (Lightning's fit loop is set "
                 "aside after its set-up)")

    # ------------------------------------------------------------------ counters
    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        """Lightning's ``global_step`` follows (NeMo's callbacks read it)."""
        self._step = value
        progress = self.trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress
        progress.optimizer.step.total.ready = value
        progress.optimizer.step.total.completed = value

    @property
    def global_batch_size(self) -> int:
        return int(self.sampler.global_batch_size)

    # ------------------------------------------------------------------ StepDriver
    def setup(self, collective: bool = True) -> None:
        """Built by Lightning before the world existed (see the module docstring)."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.metrics = JsonlWriter(self.run_dir / "metrics.jsonl", enabled=rank == 0)

    def rebuild_parallel(self) -> None:
        from megatron.core import parallel_state as ps
        from nemo.utils import AppState

        self.coords = parallel.initialize(self.strategy_cfg)
        app = AppState()  # NeMo caches a few groups here (init_model_parallel)
        app.tensor_model_parallel_group = ps.get_tensor_model_parallel_group()
        app.data_parallel_group = ps.get_data_parallel_group()
        app.pipeline_model_parallel_group = ps.get_pipeline_model_parallel_group()
        if self.metrics is None:
            self.setup()

    def rebind_roots(self) -> list[Any]:
        # every module as a root of its own: NeMo's DDP subclass and LightningModule sit
        # between megatron's objects, and the walk does not descend into NeMo's objects
        modules = [m for chunk in self.model for m in chunk.modules()]
        return [*modules, self.optimizer]

    def state_dict(self) -> dict[str, Any]:
        """Counters, data position, schedule and last record (not the optimizer shard)."""
        return {"step": self.step, "data": {"consumed_samples": self.consumed_samples},
                "schedule": {"scheduler": self.scheduler.state_dict() if self.scheduler
                             else None,
                             "lr": [g["lr"] for g in self.optimizer.param_groups]},
                "record": self.last_record}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.consumed_samples = int(state["data"]["consumed_samples"])
        schedule = state["schedule"]
        if self.scheduler is not None and schedule["scheduler"] is not None:
            self.scheduler.load_state_dict(schedule["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, schedule["lr"]):
            group["lr"] = lr
        self.last_record = state["record"]

    def reset_step_marks(self) -> None:
        self._forward_step = 0

    # ------------------------------------------------------------------ one step
    def on_megatron_microbatch_start(self, step: Any, batch: Any, forward_callback: Any) -> None:
        """NeMo's Megatron-step event: the batch (for the digest) and the forward phase."""
        tokens = batch.get("tokens") if isinstance(batch, dict) else None
        if tokens is not None:
            self._micro.append({"tokens": tokens})
        current = self.step + 1
        if self._forward_step != current:
            self._forward_step = current
            self.hooks(Phase.FORWARD, current)

    def _batches(self) -> Iterator[Any]:
        """Micro-batches from ``consumed_samples`` on (a new iterator after a failure)."""
        if self._data is None or self._data_at != self.consumed_samples:
            self.sampler.init_consumed_samples = self.consumed_samples
            loader = self.trainer.strategy.process_dataloader(
                self.trainer.datamodule.train_dataloader())
            self._data = iter(loader)
        return self._data

    def train_step(self) -> StepMetrics:
        step = self.step + 1
        try:
            return self._train_step(step)
        except BaseException:
            self._data = None  # position unknown: rebuilt from consumed_samples
            raise

    def _train_step(self, step: int) -> StepMetrics:
        start = time.perf_counter()
        self.hooks(Phase.DATA, step)
        data = self._batches()
        self._micro = []
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.wrapper.zero_grad()
        out = self.trainer.strategy.model.training_step(data)
        self._data_at = self.consumed_samples + self.global_batch_size
        loss = _loss(out)
        return finish_step(self, step, loss, start, self._batch_hash(), self.clip_grad)

    def commit(self) -> StepMetrics:
        """Local only: Adam on the shard, LR schedule, counters, metrics row."""
        pending = self.pending
        assert pending is not None and pending.step == self.step + 1
        if not pending.prepared.found_inf:
            mopt.apply_update(self.optimizer)
        if self.scheduler is not None:
            self.scheduler.step()
        lr = float(self.optimizer.param_groups[0]["lr"])  # as Lightning's record: the next
        self.consumed_samples += self.global_batch_size
        self.step = pending.step
        self.pending = None
        metrics = StepMetrics(step=pending.step, loss=pending.loss,
                              consumed_samples=self.consumed_samples,
                              step_time_s=time.perf_counter() - pending.start,
                              grad_norm=pending.prepared.grad_norm, lr=lr,
                              batch_hash=pending.batch_hash)
        self.last_record = metrics.record()
        assert self.metrics is not None
        self.metrics.write(self.last_record)
        return metrics

    def _batch_hash(self) -> str:
        from megatron.core import parallel_state as ps

        value = torch.zeros(1, dtype=torch.int64)
        if ps.is_pipeline_first_stage() and ps.get_tensor_model_parallel_rank() == 0 and \
                ps.get_context_parallel_rank() == 0 and self._micro:
            value += local_batch_digest(self._micro, dp_rank=ps.get_data_parallel_rank())
        dist.all_reduce(value)
        return f"{int(value.item()) & (2**64 - 1):016x}"

    def finish(self) -> dict[str, Any]:
        assert self.coords is not None
        summary = {"final_step": self.step, "consumed_samples": self.consumed_samples,
                   "state_sha256": job_digest(self.model, self.optimizer),
                   "world_size": self.coords.world_size}
        if self.coords.rank == 0:
            write_json(self.run_dir / "summary.json", summary)
        if self.metrics is not None:
            self.metrics.close()
        return summary


def _loss(out: Any) -> float:
    value = out.get("loss") if isinstance(out, dict) else out
    return float(torch.as_tensor(value).detach().float().cpu())


# ---------------------------------------------------------------------- Lightning glue
def _driven_run(loop: Any, drive: Callable[[Any], None]) -> None:
    """Replaces ``trainer.fit_loop.run``: Lightning's set-up, then the manager's steps."""
    loop.setup_data()
    loop.reset()
    loop.on_run_start()
    drive(loop.trainer)
    loop.on_run_end()


def run_config(recipe: Any, tier: str, fallback: str, fault_plan: list) -> RunConfig:
    """The core settings the recovery manager reads, taken from a NeMo recipe."""
    strategy = recipe.trainer.strategy
    ddp = getattr(strategy, "ddp", None)
    model = recipe.model.config
    data = recipe.data
    return RunConfig(
        name="nemo",
        model=ModelConfig(num_layers=model.num_layers, hidden_size=model.hidden_size,
                          ffn_hidden_size=model.ffn_hidden_size,
                          num_attention_heads=model.num_attention_heads,
                          num_query_groups=model.num_query_groups),
        strategy=StrategyConfig(
            tensor_model_parallel_size=strategy.tensor_model_parallel_size,
            pipeline_model_parallel_size=strategy.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=getattr(
                strategy, "virtual_pipeline_model_parallel_size", None),
            context_parallel_size=strategy.context_parallel_size,
            sequence_parallel=bool(strategy.sequence_parallel),
            use_distributed_optimizer=bool(getattr(ddp, "use_distributed_optimizer", True)),
            num_distributed_optimizer_instances=int(
                getattr(strategy, "num_distributed_optimizer_instances", 1) or 1)),
        data=DataConfig(global_batch_size=data.global_batch_size,
                        micro_batch_size=data.micro_batch_size, seq_length=data.seq_length),
        trainer=TrainerConfig(max_steps=recipe.trainer.max_steps,
                              devices=recipe.trainer.devices,
                              num_nodes=recipe.trainer.num_nodes),
        checkpointless=CheckpointlessConfig.preset(tier, fallback=fallback),
        fault=FaultConfig(plan=list(fault_plan)),
    )


def run_recipe_under_agent(recipe: Any, run_dir: str | None, channel: Any) -> dict[str, Any]:
    """Run a checkpointless NeMo recipe on a rank started by ``ncl-launch``."""
    import fiddle as fdl

    from ..runtime import run_under_agent

    strategy_node = recipe.trainer.strategy
    cfg = run_config(recipe, strategy_node.tier, getattr(strategy_node, "fallback", "none"),
                     getattr(strategy_node, "fault_plan", []) or [])
    root = Path(run_dir or recipe.log.log_dir or os.getcwd())

    def train(manager: Any) -> dict[str, Any]:
        summary: dict[str, Any] = {}
        # only now: a warm spare learns its rank when the agent assigns it
        fake_world(manager.rank, manager.world_size)  # NeMo builds its objects in it
        fn = fdl.build(recipe)
        trainer = fn.keywords["trainer"]
        strategy = trainer.strategy
        strategy.driven_hooks = manager.step_hooks
        strategy.use_gloo_process_groups = False  # gloo groups cannot form in a fake world

        def drive(pl_trainer: Any) -> None:
            module = pl_trainer.lightning_module
            module.log = _no_log  # the driven job's record is metrics.jsonl
            driver = NemoStepDriver(pl_trainer, manager.step_hooks, cfg.strategy, root)
            summary.update(manager.run(driver))

        trainer.fit_loop.run = functools.partial(_driven_run, trainer.fit_loop, drive)
        fn()
        return summary

    return run_under_agent(cfg, root, channel, train=train)


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None
