"""DDP, the (distributed) optimizer and the LR schedule, and the optimizer step in parts.

The step is split where the commit protocol needs it: ``prepare`` (grad copy, inf check,
clipping: collectives, can be redone), ``apply_update`` (the one local mutation of the
step) and ``gather_params`` (param all-gather: can be redone from main params).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..compat import megatron as compat
from ..config import OptimConfig, StrategyConfig


@dataclass
class StepResult:
    """What one optimizer step reports."""

    found_inf: bool
    grad_norm: float


def wrap_ddp(chunks: list[torch.nn.Module], strategy: StrategyConfig) -> list[torch.nn.Module]:
    """Wrap each model chunk in megatron's DistributedDataParallel."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=strategy.grad_reduce_in_fp32,
        overlap_grad_reduce=strategy.overlap_grad_reduce,
        overlap_param_gather=strategy.overlap_param_gather,
        use_distributed_optimizer=strategy.use_distributed_optimizer,
        num_distributed_optimizer_instances=strategy.num_distributed_optimizer_instances,
        check_for_nan_in_grad=False,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(
            DistributedDataParallel(
                config=chunk.config,
                ddp_config=ddp_config,
                module=chunk,
                disable_bucketing=i > 0,
            )
        )
    return wrapped


def build_optimizer(chunks: list[torch.nn.Module], optim: OptimConfig, strategy: StrategyConfig,
                    params_dtype: torch.dtype, collective: bool = True):
    """megatron's optimizer (DistributedOptimizer when the strategy asks for it).

    ``collective=False``: megatron's constructor all-gathers every rank's param-group keys
    over the world (to align groups for checkpoints). A replacement rank joining healthy
    ranks that keep their optimizers cannot take part, so the gather is answered locally:
    every rank of a dense GPT has the same keys (each holds linear weights and norms), and
    recovery checks the resulting param groups against a donor's.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype,
        use_distributed_optimizer=strategy.use_distributed_optimizer,
    )
    if collective:
        return get_megatron_optimizer(config, chunks)
    with compat.local_all_gather_object():
        return get_megatron_optimizer(config, chunks)


def build_scheduler(optimizer: Any, optim: OptimConfig, max_steps: int):
    """megatron's OptimizerParamScheduler counting in steps."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(max_steps, optim.warmup_steps + 1),
        lr_decay_style=optim.decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(max_steps, 1),
        wd_incr_style="constant",
    )


def leaf_optimizers(optimizer: Any) -> list[Any]:
    """The optimizers under a ChainedOptimizer (or the optimizer itself)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def prepare(optimizer: Any, clip_grad: float) -> StepResult:
    """Copy grads to main grads, check for inf/nan, clip. Collective; safe to redo."""
    found_inf = bool(optimizer.prepare_grads())
    grad_norm = 0.0
    if not found_inf and clip_grad > 0.0:
        grad_norm = float(optimizer.clip_grad_norm(clip_grad))
    return StepResult(found_inf=found_inf, grad_norm=grad_norm)


def apply_update(optimizer: Any) -> None:
    """The step's only mutation: Adam on the local shard, then main -> model params.

    Local compute only (no collective), so a healthy rank finishes it even while a peer
    dies; the param all-gather that DistributedOptimizer normally appends is left to
    :func:`gather_params`.
    """
    for opt in leaf_optimizers(optimizer):
        compat.step_with_ready_grads(opt)


def gather_params(model_chunks: list[torch.nn.Module], optimizer: Any) -> None:
    """All-gather updated parameter shards (distributed optimizer only). Safe to redo."""
    for opt in leaf_optimizers(optimizer):
        ddp_config = getattr(opt, "ddp_config", None)
        if ddp_config is None or not getattr(ddp_config, "use_distributed_optimizer", False):
            continue
        if ddp_config.overlap_param_gather:
            continue
        for chunk in model_chunks:
            compat.start_param_sync(chunk)
        return
