"""Lightning callback: where the checkpointless job meets Lightning's hooks, and its record.

:class:`CheckpointlessCallback` is the first callback of the trainer (``apply_checkpointless``
puts it there) and, since NeMo's strategy adds every trainer callback to
``MegatronParallel.callbacks``, also a Megatron-step callback. Under ``ncl-launch`` it
hands Lightning's moments to the rank's session (``nemo/session.py``): attach (a
replacement at ``on_fit_start``, a first start at ``on_train_start``), the start of each
iteration, each micro-batch (the ``forward`` phase and the batch digest), the end of
training (``summary.json``). In both modes it writes one ``metrics.jsonl`` row per
committed step on rank 0, with the lean loop's schema (``train/loop.py`` ``StepMetrics``);
a replacement rank 0 writes the rows its predecessor did not, once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl

from ..metrics.writer import JsonlWriter, write_json
from ..steps import Phase
from . import session as sessions

LEAN_KEYS = ("step", "loss", "loss_hex", "consumed_samples", "step_time_s", "grad_norm", "lr",
             "batch_hash")


class MetricsRows:
    """``metrics.jsonl`` on rank 0: a row per step, never twice."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.writer = JsonlWriter(path, enabled=enabled)
        self.path = Path(path)
        self.last = 0

    def read_last(self) -> None:
        """The last step already in the file (a replacement rank 0)."""
        if self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            self.last = json.loads(lines[-1])["step"] if lines else 0

    def write(self, row: dict[str, Any]) -> None:
        if row["step"] > self.last:
            self.writer.write({k: row[k] for k in LEAN_KEYS if k in row})
            self.last = row["step"]

    def close(self) -> None:
        self.writer.close()


class CheckpointlessCallback(pl.Callback):
    """Session moments and ``metrics.jsonl``; ``run_dir``: where the record goes (rank 0)."""

    def __init__(self, run_dir: Optional[str] = None) -> None:
        self.run_dir = run_dir
        self.rows: Optional[MetricsRows] = None

    def _session(self) -> Optional[sessions.CheckpointlessSession]:
        return sessions.current()

    # ------------------------------------------------------------------ Lightning
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        run_dir = Path(self.run_dir or trainer.default_root_dir)
        if self.rows is None:
            self.rows = MetricsRows(run_dir / "metrics.jsonl", enabled=trainer.global_rank == 0)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        _first(trainer, self)
        session = self._session()
        if session is not None and session.new:
            session.attach(trainer)
            if trainer.global_rank == 0:
                assert self.rows is not None
                self.rows.read_last()
                for step in sorted(session.journal.steps):
                    record = session.journal.steps[step].record
                    if record is not None and "lr" in record:
                        self.rows.write(record)

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        session = self._session()
        if session is None:
            return
        if not session.attached:
            session.attach(trainer)
        session.training_starts()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        session = self._session()
        if session is not None:
            session.begin_iteration()
        else:
            _local(trainer).begin(trainer.global_step + 1)

    def on_megatron_microbatch_start(self, step: Any, batch: Any, forward_callback: Any) -> None:
        """NeMo's Megatron-step event: one per micro-batch, with the batch itself."""
        session = self._session()
        if session is not None:
            session.on_microbatch(batch)
        else:
            _local(step.trainer).on_microbatch(step.trainer, batch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step  # the step just committed
        session = self._session()
        if session is not None:
            entry = session.journal.steps.get(step)
            record = entry.record if entry is not None else None
        else:
            hooks = getattr(trainer.strategy, "hooks", None)
            if hooks is not None:
                hooks(Phase.AFTER_STEP, step)
            record = _local(trainer).records.pop(step, None)
        if record is None:
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        record["lr"] = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None
        if self.rows is not None:
            self.rows.write(record)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        session = self._session()
        if session is not None:
            session.training_ends()
            session.finish()
        else:
            self._summary(trainer)
        if self.rows is not None:
            self.rows.close()

    def _summary(self, trainer: pl.Trainer) -> None:
        """summary.json (rank 0): final step and the core's state hash over every rank."""
        from ..megatron.state import job_digest

        optimizer = trainer.optimizers[0]
        chunks = getattr(optimizer, "model_chunks", None) or [m.module for m in
                                                              trainer.strategy.model]
        summary = {"final_step": trainer.global_step,
                   "consumed_samples": trainer.global_step * _global_batch_size(trainer),
                   "state_sha256": job_digest(chunks, getattr(optimizer, "mcore_optimizer",
                                                               optimizer)),
                   "world_size": trainer.world_size}
        if trainer.global_rank == 0:
            run_dir = Path(self.run_dir or trainer.default_root_dir)
            write_json(run_dir / "summary.json", summary)


def _first(trainer: pl.Trainer, callback: pl.Callback) -> None:
    """This callback runs first in every hook: its snapshot of an iteration's start
    precedes every other callback's work in it."""
    callbacks = trainer.callbacks
    if callbacks and callbacks[0] is not callback and callback in callbacks:
        callbacks.remove(callback)
        callbacks.insert(0, callback)


class LocalSteps:
    """Without the agent (torchrun): the step's micro-batches and records (no recovery)."""

    def __init__(self) -> None:
        self.micro: list[dict[str, Any]] = []
        self.records: dict[int, dict[str, Any]] = {}
        self.started = time.perf_counter()
        self._forward_mark = 0

    def begin(self, step: int) -> None:
        self.micro = []
        self.started = time.perf_counter()

    def on_microbatch(self, trainer: Any, batch: Any) -> None:
        tokens = batch.get("tokens") if isinstance(batch, dict) else None
        if tokens is not None:
            self.micro.append({"tokens": tokens})
        step = trainer.global_step + 1
        if self._forward_mark != step:
            self._forward_mark = step
            hooks = getattr(trainer.strategy, "hooks", None)
            if hooks is not None:
                hooks(Phase.FORWARD, step)


def _local(trainer: Any) -> LocalSteps:
    strategy = trainer.strategy
    steps = getattr(strategy, "local_steps", None)
    if steps is None:
        steps = strategy.local_steps = LocalSteps()
    return steps


def _global_batch_size(trainer: pl.Trainer) -> int:
    sampler = getattr(trainer.strategy, "data_sampler", None)
    gbs = getattr(sampler, "global_batch_size", None)
    if gbs is None:
        gbs = getattr(getattr(trainer, "datamodule", None), "global_batch_size", 0)
    return int(gbs or 0)
