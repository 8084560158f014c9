"""A lean megatron-core training loop: parallel state, GPTModel, DDP, optimizer, schedule.

The loop knows nothing of recovery or faults: both attach through :class:`HookList` at the
phases of a step (``steps.py``); recovery drives :class:`Trainer` through the
:class:`~nemo_checkpointless.steps.StepDriver` surface, and :meth:`Trainer.run` is the loop
without recovery.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from .. import device
from ..config import RunConfig
from ..heap import freeze
from ..megatron import optimizer as mopt
from ..megatron import parallel
from ..megatron.model import build_model_chunks
from ..megatron.shards import make_state_contiguous
from ..megatron.state import job_digest
from ..metrics.progress import Progress
from ..metrics.writer import JsonlWriter, write_json
from ..state import DataPosition
from ..steps import HookList, Phase
from .data import StepSource, local_batch_digest, make_step_data

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class StepMetrics:
    """What one committed step reports (rank 0 writes it to metrics.jsonl)."""

    step: int
    loss: float
    consumed_samples: int
    step_time_s: float
    grad_norm: float
    lr: float
    batch_hash: str

    def record(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "loss": self.loss,
            "loss_hex": float(self.loss).hex(),
            "consumed_samples": self.consumed_samples,
            "step_time_s": round(self.step_time_s, 6),
            "grad_norm": self.grad_norm,
            "lr": self.lr,
            "batch_hash": self.batch_hash,
            "time": round(time.time(), 6),  # wall clock at the commit (cadence, benchmarks)
        }


@dataclass
class PendingCommit:
    """A step whose gradients are final and whose update is not applied yet."""

    step: int
    prepared: mopt.StepResult
    loss: float
    start: float
    batch_hash: str


def finish_step(driver: Any, step: int, loss: float, start: float, batch_hash: str,
                clip_grad: float) -> "StepMetrics":
    """The end of every step, whatever ran its forward and backward (the lean loop, or
    NeMo's driver): prepare the update (clip, found-inf), stop at the commit point, apply
    it, re-gather the parameters. ``driver`` has ``optimizer``, ``model``, ``hooks``,
    ``pending`` and ``commit()``."""
    prepared = mopt.prepare(driver.optimizer, clip_grad)
    driver.pending = PendingCommit(step, prepared, loss, start, batch_hash)
    driver.hooks(Phase.OPTIMIZER, step)
    metrics = driver.commit()
    driver.hooks(Phase.PARAM_SYNC, step)
    mopt.gather_params(driver.model, driver.optimizer)
    driver.hooks(Phase.AFTER_STEP, step)
    return metrics


class Trainer:
    """Owns the model, optimizer, scheduler and data of one rank, and runs steps."""

    def __init__(self, cfg: RunConfig, run_dir: Path, hooks: Optional[HookList] = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.hooks = hooks or HookList()
        self.step = 0
        self.position = DataPosition()
        self.coords: Optional[parallel.Coordinates] = None
        self.model: list[torch.nn.Module] = []
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.data: Optional[StepSource] = None
        self.metrics: Optional[JsonlWriter] = None
        self._forward_step = 0
        self._backward_step = 0
        self.pending: Optional[PendingCommit] = None
        self.last_record: Optional[dict[str, Any]] = None

    @property
    def consumed_samples(self) -> int:
        return self.position.consumed_samples

    @consumed_samples.setter
    def consumed_samples(self, value: int) -> None:
        self.position.consumed_samples = value

    # ------------------------------------------------------------------ set-up
    def setup(self, collective: bool = True,
              prebuilt: Optional[Callable[[], Optional[list[torch.nn.Module]]]] = None) -> None:
        """Build parallel state, seed, model chunks, DDP, optimizer, scheduler and data.

        ``collective=False``: a replacement rank joining healthy ones that do not rebuild.
        It builds without the world-wide collective megatron's optimizer constructor makes,
        and without drawing initial weights (every weight comes from its peers).
        ``prebuilt``: called once parallel state exists; returns DDP chunks built earlier
        (a warm spare's, rebound to this world) or None to build them here.
        """
        cfg = self.cfg
        marks = [time.perf_counter()]
        torch.set_num_threads(cfg.trainer.num_threads)
        self.coords = parallel.initialize(cfg.strategy)
        parallel.seed_everything(cfg.trainer.seed, self.coords)
        marks.append(time.perf_counter())
        dtype = _DTYPES[cfg.model.params_dtype]
        # Replacements run megatron's initialization too (zero-filled, not drawn: peers
        # overwrite every weight): it is what sets the tensor-parallel attributes the
        # grad-norm reduction reads, and skipping it broke exactness under TP=2.
        ready = prebuilt() if prebuilt is not None else None
        if ready is None:
            chunks = build_model_chunks(cfg.model, cfg.strategy, cfg.data.seq_length,
                                        draw_weights=collective)
            marks.append(time.perf_counter())
            self.model = mopt.wrap_ddp(chunks, cfg.strategy)
        else:
            self.model = ready
            marks.append(time.perf_counter())
        marks.append(time.perf_counter())
        self.optimizer = mopt.build_optimizer(self.model, cfg.optim, cfg.strategy, dtype,
                                              collective=collective)
        make_state_contiguous(self.optimizer)
        marks.append(time.perf_counter())
        self.scheduler = mopt.build_scheduler(self.optimizer, cfg.optim, cfg.trainer.max_steps)
        self._install_grad_sync_hook()
        self.data = make_step_data(cfg, self.coords, run_dir=self.run_dir)
        self.metrics = JsonlWriter(self.run_dir / "metrics.jsonl", enabled=self.coords.rank == 0)
        freeze("set-up")  # model, optimizer, data: full collector passes skip them
        marks.append(time.perf_counter())
        log.info("set-up: parallel state %.3fs, model %.3fs, DDP %.3fs, optimizer %.3fs, "
                 "scheduler and data %.3fs%s", *(b - a for a, b in zip(marks, marks[1:])),
                 " (model and DDP built before this rank was assigned)" if ready else "")

    def _install_grad_sync_hook(self) -> None:
        from megatron.core.distributed import finalize_model_grads

        def finalize(model: list[torch.nn.Module], *args: Any, **kwargs: Any) -> None:
            self.hooks(Phase.GRAD_SYNC, self.step + 1)
            finalize_model_grads(model, *args, **kwargs)

        for chunk in self.model:
            chunk.config.finalize_model_grads_func = finalize

    # ------------------------------------------------------------------ recovery surface
    def rebuild_parallel(self) -> None:
        """Re-run ``initialize_model_parallel`` with the same sizes (the world exists)."""
        self.coords = parallel.initialize(self.cfg.strategy)

    def rebind_roots(self) -> list[Any]:
        """Objects that may cache process groups (rebound after a rebuild)."""
        return [self.model, self.optimizer, self.scheduler]

    def state_dict(self) -> dict[str, Any]:
        """Counters, data position, schedule and last record (not the optimizer shard)."""
        return {"step": self.step, "data": self.position.state_dict(),
                "scheduler": {"num_steps": self.scheduler.num_steps},
                "record": self.last_record}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.position.load_state_dict(state["data"])
        # megatron's own load_state_dict adds to the current count (meant for a fresh
        # scheduler); a survivor rolling back already has one
        self.scheduler.num_steps = int(state["scheduler"]["num_steps"])
        self.scheduler.step(increment=0)
        self.last_record = state["record"]

    def reset_step_marks(self) -> None:
        """Forget which phases of the interrupted step already fired."""
        self._forward_step = self._backward_step = 0

    # ------------------------------------------------------------------ one step
    @property
    def num_microbatches(self) -> int:
        assert self.coords is not None
        d = self.cfg.data
        return d.global_batch_size // (d.micro_batch_size * self.coords.dp_size)

    def _forward_step_func(self, data_iterator: Iterator[dict], model: torch.nn.Module):
        batch = to_device(next(data_iterator))
        step = self.step + 1
        if self._forward_step != step:
            self._forward_step = step
            self.hooks(Phase.FORWARD, step)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        if output.requires_grad:
            output.register_hook(self._backward_hook)
        loss_mask = batch["loss_mask"].float()

        def loss_func(per_token: torch.Tensor):
            loss = torch.sum(per_token.float().view(-1) * loss_mask.view(-1)) / loss_mask.sum()
            # megatron scales the returned loss in place: report an unscaled copy
            return loss, {"lm loss": loss.detach().clone()}

        return output, loss_func

    def _backward_hook(self, grad: torch.Tensor) -> torch.Tensor:
        step = self.step + 1
        if self._backward_step != step:
            self._backward_step = step
            self.hooks(Phase.BACKWARD, step)
        return grad

    def _batch_hash(self, micro_batches: list[dict]) -> str:
        """Digest of the step's global batch (each DP slice counted once), on every rank.

        The same all-reduce also checks that every tensor-parallel rank of a DP slice got
        the same batch (readers of the data cache, a replaced loader): a disagreement
        stops the step instead of training on mismatched inputs.
        """
        assert self.coords is not None
        c = self.coords
        value = device.zeros(2, torch.int64)
        if c.pp_rank == 0 and c.cp_rank == 0:
            digest = local_batch_digest(micro_batches, dp_rank=c.dp_rank)
            value[1] += digest
            if c.tp_rank == 0:
                value[0] += digest
        dist.all_reduce(value)
        mask = 2**64 - 1
        total, every_tp = int(value[0].item()) & mask, int(value[1].item()) & mask
        if every_tp != (total * c.tp_size) & mask:
            raise RuntimeError(
                f"step {self.step + 1}: the tensor-parallel ranks of some data-parallel slice "
                "got different batches (data cache readers out of step with their loader); "
                "refusing to train on mismatched inputs")
        return f"{total:016x}"

    def _reduce_loss(self, losses: list[dict]) -> float:
        """Mean lm loss over micro-batches and DP ranks, known on every rank afterwards."""
        assert self.coords is not None
        value = device.zeros(1, torch.float64)
        if self.coords.is_last_stage and self.coords.tp_rank == 0 and losses:
            value += sum(float(x["lm loss"]) for x in losses) / len(losses)
        dist.all_reduce(value)
        # host: the mean rounded to fp32 (the precision megatron logs), a plain number
        return float(torch.tensor(value.item() / self.coords.dp_size, dtype=torch.float32,
                                  device=device.HOST))

    def train_step(self) -> StepMetrics:
        """Run step ``self.step + 1`` end to end and return its metrics."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        assert self.data is not None
        step = self.step + 1
        start = time.perf_counter()
        self.hooks(Phase.DATA, step)
        micro_batches = self.data.micro_batches(self.consumed_samples)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        forward_backward = get_forward_backward_func()
        data_iter: Any = iter(micro_batches)
        if len(self.model) > 1:
            data_iter = [iter(micro_batches) for _ in self.model]
        losses = forward_backward(
            forward_step_func=self._forward_step_func,
            data_iterator=data_iter,
            model=self.model,
            num_microbatches=self.num_microbatches,
            seq_length=self.cfg.data.seq_length,
            micro_batch_size=self.cfg.data.micro_batch_size,
            forward_only=False,
        )
        loss = self._reduce_loss(losses)
        batch_hash = self._batch_hash(micro_batches)
        return finish_step(self, step, loss, start, batch_hash, self.cfg.optim.clip_grad)

    def commit(self) -> StepMetrics:
        """The step's single mutation: optimizer update, schedule, counters, metrics row.

        Local only (no collective): a rank that starts it finishes it. Also how a rank
        rolls a step forward during recovery.
        """
        pending = self.pending
        assert pending is not None and pending.step == self.step + 1
        if not pending.prepared.found_inf:
            mopt.apply_update(self.optimizer)
        self.scheduler.step(increment=1)
        self.position.advance(self.cfg.data.global_batch_size)
        self.step = pending.step
        self.pending = None
        metrics = StepMetrics(
            step=pending.step,
            loss=pending.loss,
            consumed_samples=self.consumed_samples,
            step_time_s=time.perf_counter() - pending.start,
            grad_norm=pending.prepared.grad_norm,
            lr=float(self.optimizer.param_groups[0]["lr"]),
            batch_hash=pending.batch_hash,
        )
        self.last_record = metrics.record()
        assert self.metrics is not None
        self.metrics.write(self.last_record)
        return metrics

    # ------------------------------------------------------------------ whole run
    def run(self) -> dict[str, Any]:
        """Train to ``trainer.max_steps`` without recovery; write summary.json on rank 0."""
        assert self.coords is not None
        progress = make_progress(self.cfg, self.coords.rank == 0)
        while self.step < self.cfg.trainer.max_steps:
            progress.on_step(self.train_step())
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Hash the job's state and write summary.json (rank 0)."""
        assert self.coords is not None
        summary = {
            "final_step": self.step,
            "consumed_samples": self.consumed_samples,
            "state_sha256": job_digest(self.model, self.optimizer),
            "world_size": self.coords.world_size,
            "layout": {
                "tp": self.coords.tp_size,
                "pp": self.coords.pp_size,
                "dp": self.coords.dp_size,
                "cp": self.coords.cp_size,
                "num_distributed_optimizer_instances":
                    self.cfg.strategy.num_distributed_optimizer_instances,
            },
        }
        if self.coords.rank == 0:
            write_json(self.run_dir / "summary.json", summary)
        if self.metrics is not None:
            self.metrics.close()
        return summary


def to_device(batch: dict[str, Any]) -> dict[str, Any]:
    """A micro-batch on the rank's device (batches are read and cached on the host)."""
    target = device.current()
    return {k: v.to(target, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def make_progress(cfg: RunConfig, lead: bool) -> Progress:
    """The progress reporter of a run of ``cfg`` (rank 0 logs; every rank checks)."""
    return Progress(max_steps=cfg.trainer.max_steps, interval=cfg.trainer.log_interval,
                    tokens_per_step=cfg.data.global_batch_size * cfg.data.seq_length,
                    enabled=lead)
