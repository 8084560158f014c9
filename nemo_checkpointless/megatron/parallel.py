"""Megatron parallel state from a :class:`StrategyConfig`, and the seeding that goes with it."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from ..config import StrategyConfig


@dataclass(frozen=True)
class Coordinates:
    """This rank's place in the layout (all ranks of one job agree on these sizes)."""

    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    cp_rank: int
    cp_size: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def initialize(strategy: StrategyConfig, gloo_groups: bool = True) -> Coordinates:
    """Run ``initialize_model_parallel`` with the strategy's sizes (world group must exist).

    megatron's groups get the world's collective timeout (``comm.world.default_timeout``)
    instead of megatron's 30 minutes: on gloo a pipeline recv is woken by nothing else
    when its peer is gone, so the timeout is the bound on a stuck recovery.
    """
    import math

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from ..comm.world import default_timeout

    timeout = default_timeout(dist.get_backend())
    ps.initialize_model_parallel(
        distributed_timeout_minutes=max(1, math.ceil(timeout.total_seconds() / 60)),
        tensor_model_parallel_size=strategy.tensor_model_parallel_size,
        pipeline_model_parallel_size=strategy.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=strategy.virtual_pipeline_model_parallel_size,
        context_parallel_size=strategy.context_parallel_size,
        num_distributed_optimizer_instances=strategy.num_distributed_optimizer_instances,
        create_gloo_process_groups=gloo_groups,  # False in a fake world: gloo cannot form
    )
    return coordinates()


def model_is_rank_independent(strategy: StrategyConfig) -> bool:
    """Whether every rank builds the same model chunks (no tensor, pipeline or context
    split): a warm spare can then build its model before it knows its rank."""
    return (strategy.tensor_model_parallel_size == 1
            and strategy.pipeline_model_parallel_size == 1
            and not strategy.virtual_pipeline_model_parallel_size
            and strategy.context_parallel_size == 1)


def coordinates() -> Coordinates:
    """Read this rank's coordinates from megatron's parallel state."""
    from megatron.core import parallel_state as ps

    return Coordinates(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
        cp_size=ps.get_context_parallel_world_size(),
    )


def seed_everything(seed: int, coords: Coordinates) -> None:
    """Megatron's seeding: one stream per pipeline stage, TP streams from the RNG tracker."""
    from megatron.core import tensor_parallel

    stage_seed = seed + 100 * coords.pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy() -> None:
    """Tear megatron's parallel state down (groups are destroyed by the caller)."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
