"""NeMo's objects behind the core's step-driver contract (what the recovery loop reads).

Lightning runs the loop; :class:`NemoStepDriver` exposes to the core's
:class:`~nemo_checkpointless.recovery.generation.RecoveryLoop` what it needs to settle a
generation (:class:`~nemo_checkpointless.steps.StepDriver`): the committed step and data
position, megatron's DDP chunks and optimizer, the pending (prepared, not applied) update,
the commit (used to roll a step forward), the LR of the running step, the parallel
state's rebuild (NeMo's recorded arguments, ``nemo/parallel.py``) and the objects whose
group handles are rebound. ``train_step`` is not used: steps run inside Lightning
(``nemo/session.py``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from .. import device
from ..megatron import optimizer as mopt
from ..megatron import parallel
from ..megatron.shards import make_state_contiguous
from ..megatron.state import job_digest
from ..steps import HookList
from ..train.data import local_batch_digest
from ..train.loop import PendingCommit, StepMetrics
from .parallel import ParallelLayout


class _NoRows:
    """The loop writes a ``metrics.jsonl`` row only from ``last_record`` (None here):
    rows are written by the callback, from the journal (``nemo/callbacks.py``)."""

    def write(self, record: dict[str, Any]) -> None:
        return None

    def truncate_after(self, step: int) -> int:
        return 0


class NemoStepDriver:
    """One rank's NeMo objects, read and set by the recovery loop."""

    # a stop's checkpoint is the trainer's ModelCheckpoint's (nemo/stop.py), not the core's
    writes_stop_checkpoint = True

    def __init__(self, trainer: Any, hooks: HookList, layout: ParallelLayout,
                 run_dir: Path) -> None:
        self.trainer = trainer
        self.hooks = hooks
        self.layout = layout
        self.run_dir = Path(run_dir)
        wrapper = trainer.optimizers[0]
        self.optimizer = wrapper.mcore_optimizer
        self.model: list[torch.nn.Module] = list(wrapper.model_chunks)
        self.sampler = trainer.strategy.data_sampler
        self.coords: Optional[parallel.Coordinates] = parallel.coordinates()
        self.step = int(trainer.global_step)
        self.consumed_samples = int(self.sampler.init_consumed_samples) + \
            (self.step - int(getattr(self.sampler, "init_global_step", 0))) * self.global_batch_size
        self.pending: Optional[PendingCommit] = None
        self.last_record: Optional[dict[str, Any]] = None
        self.metrics = _NoRows()
        self.on_commit: Any = None  # set by the session: journal the step's record
        self.clip_grad = float(getattr(self.optimizer.config, "clip_grad", 0.0) or 0.0)
        make_state_contiguous(self.optimizer)  # one byte range for the peer transfer

    @property
    def global_batch_size(self) -> int:
        return int(self.sampler.global_batch_size)

    # ------------------------------------------------------------------ StepDriver
    def setup(self, collective: bool = True) -> None:
        return None

    def train_step(self) -> Any:
        raise NotImplementedError("Lightning runs the steps of a NeMo job")

    def rebuild_parallel(self) -> None:
        self.coords = self.layout.rebuild()

    def rebind_roots(self) -> list[Any]:
        # every module as a root of its own: NeMo's DDP subclass and the LightningModule sit
        # between megatron's objects, and the walk does not descend into NeMo's objects
        modules = [m for chunk in self.model for m in chunk.modules()]
        return [*modules, self.optimizer]

    def state_dict(self) -> dict[str, Any]:
        """Counters, data position, the LR the running step uses and the last record (not
        the optimizer shard). Lightning steps NeMo's scheduler after the step; the
        scheduler's own state travels with Lightning's (``nemo/session.py``)."""
        return {"step": self.step, "data": {"consumed_samples": self.consumed_samples},
                "schedule": {"lr": [g["lr"] for g in self.optimizer.param_groups]},
                "record": self.last_record}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.consumed_samples = int(state["data"]["consumed_samples"])
        for group, lr in zip(self.optimizer.param_groups, state["schedule"]["lr"]):
            group["lr"] = lr
        self.last_record = state["record"]

    def reset_step_marks(self) -> None:
        return None

    # ------------------------------------------------------------------ one step
    def commit(self) -> StepMetrics:
        """Local only: the optimizer update, the counters, the step's record."""
        pending = self.pending
        assert pending is not None and pending.step == self.step + 1
        if not pending.prepared.found_inf:
            mopt.apply_update(self.optimizer)
        self.consumed_samples += self.global_batch_size
        self.step = pending.step
        self.pending = None
        metrics = StepMetrics(step=pending.step, loss=pending.loss,
                              consumed_samples=self.consumed_samples,
                              step_time_s=time.perf_counter() - pending.start,
                              grad_norm=pending.prepared.grad_norm, lr=float("nan"),
                              batch_hash=pending.batch_hash)
        if self.on_commit is not None:
            self.on_commit(pending.step, metrics, pending.prepared)
        return metrics

    def finish(self) -> dict[str, Any]:
        """The summary (the loop writes ``summary.json``): the state hash is collective."""
        assert self.coords is not None
        c = self.coords
        return {"final_step": self.step, "consumed_samples": self.consumed_samples,
                "state_sha256": job_digest(self.model, self.optimizer),
                "world_size": c.world_size,
                "layout": {"tp": c.tp_size, "pp": c.pp_size, "dp": c.dp_size, "cp": c.cp_size}}


def batch_hash(micro_batches: list[dict[str, torch.Tensor]]) -> str:
    """The lean loop's global-batch digest: each DP slice counted once, on every rank
    (collective over the world)."""
    from megatron.core import parallel_state as ps

    value = device.zeros(1, torch.int64)
    if ps.is_pipeline_first_stage() and ps.get_tensor_model_parallel_rank() == 0 and \
            ps.get_context_parallel_rank() == 0 and micro_batches:
        value += local_batch_digest(micro_batches, dp_rank=ps.get_data_parallel_rank())
    dist.all_reduce(value)
    return f"{int(value.item()) & (2**64 - 1):016x}"
