"""Lightning callback: step phases for the core's hooks, and the metrics.jsonl record.

:class:`CheckpointlessCallback` is a Lightning callback and, since NeMo's strategy adds
every trainer callback to ``MegatronParallel.callbacks``, also a Megatron-step callback.
It calls the strategy's :class:`~nemo_checkpointless.steps.HookList` at the phases
Lightning and NeMo expose (``data`` at batch start, ``forward`` at the first micro-batch,
``after_step`` at batch end; ``grad_sync``, ``optimizer`` and ``param_sync`` come from the
optimizer, see ``nemo/optim.py``) and writes one ``metrics.jsonl`` row per committed step
on rank 0, with the lean loop's schema (``train/loop.py`` ``StepMetrics``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from ..metrics.writer import JsonlWriter
from ..train.data import local_batch_digest
from ..steps import Phase


class CheckpointlessCallback(pl.Callback):
    """Phases and metrics of each step; ``run_dir``: where metrics.jsonl goes (rank 0)."""

    def __init__(self, run_dir: Optional[str] = None) -> None:
        self.run_dir = run_dir
        self.metrics: Optional[JsonlWriter] = None
        self._start = 0.0
        self._micro: list[dict[str, torch.Tensor]] = []
        self._forward_step = 0

    # ------------------------------------------------------------------ Lightning
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if _driven(trainer):  # nemo/driver.py runs the steps and writes the record
            return
        run_dir = Path(self.run_dir or trainer.default_root_dir)
        self.metrics = JsonlWriter(run_dir / "metrics.jsonl", enabled=trainer.global_rank == 0)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        self._start = time.perf_counter()
        self._micro = []
        _hooks(trainer)(Phase.DATA, trainer.global_step + 1)

    def on_megatron_microbatch_start(self, step: Any, batch: Any, forward_callback: Any) -> None:
        """NeMo's Megatron-step event: one per micro-batch, with the batch itself."""
        trainer = step.trainer
        if _driven(trainer):
            return
        if isinstance(batch, dict) and batch.get("tokens") is not None:
            self._micro.append({"tokens": batch["tokens"]})
        current = trainer.global_step + 1
        if self._forward_step != current:
            self._forward_step = current
            _hooks(trainer)(Phase.FORWARD, current)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step  # already counts the step just committed
        _hooks(trainer)(Phase.AFTER_STEP, step)
        record = self._record(trainer, step, outputs)
        if self.metrics is not None:
            self.metrics.write(record)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        """summary.json (rank 0): final step and the core's state hash over every rank."""
        from ..megatron.state import job_digest
        from ..metrics.writer import write_json

        if _driven(trainer):
            return
        optimizer = trainer.optimizers[0]
        chunks = getattr(optimizer, "model_chunks", None) or [m.module for m in
                                                              trainer.strategy.model]
        summary = {"final_step": trainer.global_step,
                   "consumed_samples": trainer.global_step * _global_batch_size(trainer),
                   "state_sha256": job_digest(chunks, getattr(optimizer, "mcore_optimizer",
                                                               optimizer)),
                   "world_size": trainer.world_size}
        if self.metrics is not None:
            self.metrics.close()
            if self.metrics.enabled:
                write_json(self.metrics.path.parent / "summary.json", summary)

    # ------------------------------------------------------------------ record
    def _record(self, trainer: pl.Trainer, step: int, outputs: Any) -> dict[str, Any]:
        from megatron.core import parallel_state as ps

        loss = _loss(outputs)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        last = getattr(optimizer, "last", None)
        gbs = _global_batch_size(trainer)
        return {
            "step": step,
            "loss": loss,
            "loss_hex": float(loss).hex() if math.isfinite(loss) else repr(loss),
            "consumed_samples": step * gbs,
            "step_time_s": round(time.perf_counter() - self._start, 6),
            "grad_norm": float(last.grad_norm) if last is not None else None,
            "lr": float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None,
            "batch_hash": self._batch_hash(ps),
        }

    def _batch_hash(self, ps: Any) -> str:
        """The lean loop's global-batch digest: each DP slice counted once, on every rank."""
        value = torch.zeros(1, dtype=torch.int64)
        first = ps.is_pipeline_first_stage()
        if first and ps.get_tensor_model_parallel_rank() == 0 and \
                ps.get_context_parallel_rank() == 0 and self._micro:
            value += local_batch_digest(self._micro, dp_rank=ps.get_data_parallel_rank())
        if dist.is_initialized():
            dist.all_reduce(value)
        return f"{int(value.item()) & (2**64 - 1):016x}"


def _driven(trainer: Any) -> bool:
    """The recovery manager drives the steps (``nemo/driver.py``, under ncl-launch)."""
    return getattr(getattr(trainer, "strategy", None), "driven_hooks", None) is not None


def _hooks(trainer: pl.Trainer):
    hooks = getattr(trainer.strategy, "hooks", None)
    return hooks if hooks is not None else (lambda phase, step: None)


def _loss(outputs: Any) -> float:
    value = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if torch.is_tensor(value):
        return float(value.detach().float().cpu())
    return float("nan") if value is None else float(value)


def _global_batch_size(trainer: pl.Trainer) -> int:
    sampler = getattr(trainer.strategy, "data_sampler", None)
    gbs = getattr(sampler, "global_batch_size", None)
    if gbs is None:
        gbs = getattr(getattr(trainer, "datamodule", None), "global_batch_size", 0)
    return int(gbs or 0)
