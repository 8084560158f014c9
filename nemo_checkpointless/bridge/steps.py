"""What a Bridge step reports, the same whether Bridge's loop runs alone or driven.

* :class:`RecordingForwardStep` wraps Bridge's forward step (``gpt_step.forward_step`` by
  default): while a training step is open it fires the ``forward`` and ``backward`` phases
  and keeps the step's token batches for the batch digest; in evaluation it only forwards.
* :func:`lm_loss` is Bridge's reduction of the micro-batch losses (``train_step``'s, done
  the same way so the bits agree); :func:`job_loss` and :func:`job_batch_hash` bring the
  step's loss and batch digest to every rank (rank 0 writes them).
* :class:`MetricsCallback` writes ``metrics.jsonl`` (one row per step, the lean loop's
  schema) and ``summary.json`` from Bridge's callbacks when Bridge runs alone (torchrun);
  under the recovery loop the step driver writes the same rows at each commit.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..compat.bridge import import_bridge

import_bridge()  # before any megatron.bridge module: it imports without Transformer Engine

from megatron.bridge.training.callbacks import Callback, CallbackContext  # noqa: E402
from megatron.bridge.training.state import GlobalState  # noqa: E402

from ..megatron.state import job_digest  # noqa: E402
from ..metrics.writer import JsonlWriter, write_json  # noqa: E402
from ..steps import HookList, Phase  # noqa: E402
from ..train.data import local_batch_digest  # noqa: E402
from ..train.loop import StepMetrics  # noqa: E402


class _RecordingIterator:
    """Hands batches through, keeping each one's tokens."""

    def __init__(self, inner: Any, sink: list[dict[str, torch.Tensor]]) -> None:
        self.inner, self.sink = inner, sink

    def __iter__(self) -> "_RecordingIterator":
        return self

    def __next__(self) -> Any:
        batch = next(self.inner)
        if isinstance(batch, dict) and batch.get("tokens") is not None:
            self.sink.append({"tokens": batch["tokens"]})
        return batch


def _vp_stage(model: Any) -> Optional[int]:
    while model is not None and not hasattr(model, "vp_stage"):
        model = getattr(model, "module", None)
    return getattr(model, "vp_stage", None)


class RecordingForwardStep:
    """Bridge's forward step, with the step phases and the batch record (see module doc)."""

    def __init__(self, forward_step: Optional[Callable[..., Any]] = None,
                 hooks: Optional[HookList] = None) -> None:
        if forward_step is None:
            from megatron.bridge.training.gpt_step import forward_step as gpt_forward_step

            forward_step = gpt_forward_step
        self.inner = forward_step
        self.hooks = hooks or HookList()
        self.micro_batches: list[dict[str, torch.Tensor]] = []
        self.step = 0  # the open training step (0: none, e.g. evaluation)
        self._forward_step = self._backward_step = 0
        self._bound: Optional[Callable[..., Any]] = None
        self._schedule_plan_arg = False

    def begin(self, step: int) -> None:
        self.step = step
        self.micro_batches = []

    def end(self) -> None:
        self.step = 0

    def reset_marks(self) -> None:
        self._forward_step = self._backward_step = 0

    def __call__(self, state: GlobalState, data_iterator: Any, model: Any,
                 return_schedule_plan: bool = False) -> Any:
        if self._bound is None:
            from megatron.bridge.training.utils.train_utils import prepare_forward_step_func

            self._bound = prepare_forward_step_func(self.inner, state)
            self._schedule_plan_arg = "return_schedule_plan" in inspect.signature(
                self._bound).parameters
        step = self.step
        if step:
            if self._forward_step != step:
                self._forward_step = step
                self.hooks(Phase.FORWARD, step)
            if data_iterator is not None and _vp_stage(model) in (None, 0):
                data_iterator = _RecordingIterator(data_iterator, self.micro_batches)
        args = (data_iterator, model) + ((return_schedule_plan,) if self._schedule_plan_arg
                                         else ())
        output, loss_func = self._bound(*args)
        if step and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._backward_hook)
        return output, loss_func

    def _backward_hook(self, grad: torch.Tensor) -> torch.Tensor:
        step = self.step
        if step and self._backward_step != step:
            self._backward_step = step
            self.hooks(Phase.BACKWARD, step)
        return grad


# ---------------------------------------------------------------------- step values
def lm_loss(losses_reduced: list[dict[str, torch.Tensor]], dp_cp_group: Any) -> Optional[torch.Tensor]:
    """The step's ``lm loss`` as Bridge's ``train_step`` reduces it (last pipeline stage;
    None elsewhere): token-weighted over the global batch, or the micro-batch mean."""
    if not losses_reduced or "lm loss" not in losses_reduced[0]:
        return None
    values = [x["lm loss"].view(-1) for x in losses_reduced]
    if values[0].numel() == 2:
        total = torch.vstack(values).sum(dim=0)
        dist.all_reduce(total, group=dp_cp_group)
        return total[0] / total[1]
    return torch.cat(values).mean()


def _reporter() -> bool:
    """The one rank whose loss goes to rank 0: last stage, first TP/CP/DP coordinate."""
    from megatron.core import parallel_state as ps

    return (ps.is_pipeline_last_stage(ignore_virtual=True)
            and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_context_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0)


def _device() -> torch.device:
    """Where control tensors of a collective live (NCCL refuses host tensors)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def job_loss(loss: Optional[torch.Tensor]) -> float:
    """The step's loss on every rank (collective over the world), bit for bit the value
    the reporting rank computed (float32 through float64 is exact)."""
    value = torch.zeros(1, dtype=torch.float64, device=_device())
    if loss is not None and _reporter():
        value += float(loss.detach().float().cpu())
    dist.all_reduce(value)
    # host: rounding a number to float32, no collective
    return float(torch.tensor(value.item(), dtype=torch.float32, device="cpu"))


def job_batch_hash(micro_batches: list[dict[str, torch.Tensor]]) -> str:
    """Digest of the step's global batch (each DP slice counted once), on every rank."""
    from megatron.core import parallel_state as ps

    value = torch.zeros(1, dtype=torch.int64, device=_device())
    if ps.is_pipeline_first_stage(ignore_virtual=True) and \
            ps.get_tensor_model_parallel_rank() == 0 and \
            ps.get_context_parallel_rank() == 0 and micro_batches:
        value += local_batch_digest(micro_batches, dp_rank=ps.get_data_parallel_rank())
    dist.all_reduce(value)
    return f"{int(value.item()) & (2**64 - 1):016x}"


def logged_grad_norm(value: Optional[float]) -> float:
    """The grad norm as Bridge's ``train_step`` reports it (reduced as float32)."""
    # host: rounding a number to float32, no collective
    return float(torch.tensor(float(value or 0.0), dtype=torch.float32, device="cpu"))


def first_lr(optimizer: Any) -> float:
    return float(optimizer.param_groups[0]["lr"])


def global_batch(state: GlobalState) -> int:
    """Samples one iteration consumes (Bridge's loop: DP x micro-batch x micro-batches)."""
    from megatron.core.num_microbatches_calculator import get_num_microbatches

    cfg = state.cfg
    return int(cfg.data_parallel_size * cfg.train.micro_batch_size * get_num_microbatches())


# ---------------------------------------------------------------------- Bridge alone
class MetricsCallback(Callback):
    """``metrics.jsonl`` and ``summary.json`` from Bridge's own loop (torchrun)."""

    def __init__(self, run_dir: Path, forward: RecordingForwardStep) -> None:
        self.run_dir = Path(run_dir)
        self.forward = forward
        self.writer: Optional[JsonlWriter] = None
        self._start = 0.0

    def on_train_start(self, context: CallbackContext) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = JsonlWriter(self.run_dir / "metrics.jsonl", enabled=dist.get_rank() == 0)

    def on_train_step_start(self, context: CallbackContext) -> None:
        self._start = time.perf_counter()
        self.forward.begin(context.state.train_state.step + 1)

    def on_train_step_end(self, context: CallbackContext) -> None:
        state = context.state
        step = state.train_state.step + 1
        self.forward.end()
        loss = job_loss((context.loss_dict or {}).get("lm loss"))
        metrics = StepMetrics(
            step=step, loss=loss,
            consumed_samples=state.train_state.consumed_train_samples + global_batch(state),
            step_time_s=time.perf_counter() - self._start,
            grad_norm=logged_grad_norm(context.grad_norm), lr=first_lr(context.optimizer),
            batch_hash=job_batch_hash(self.forward.micro_batches))
        assert self.writer is not None
        self.writer.write(metrics.record())

    def on_train_end(self, context: CallbackContext) -> None:
        state = context.state
        summary = summarize(context.model, context.optimizer, state.train_state.step,
                            state.train_state.consumed_train_samples)
        if dist.get_rank() == 0:
            write_json(self.run_dir / "summary.json", summary)
        if self.writer is not None:
            self.writer.close()


def summarize(model: list[Any], optimizer: Any, step: int, consumed: int) -> dict[str, Any]:
    """The run's summary (collective): final step, samples, state hash, world size."""
    return {"final_step": int(step), "consumed_samples": int(consumed),
            "state_sha256": job_digest(model, optimizer),
            "world_size": dist.get_world_size()}
