"""The pieces of one rank's state that a replacement needs, and where their replicas are.

* ``shard_key``: two ranks hold byte-identical optimizer state (fp32 main params, Adam
  moments, step) iff their keys are equal. Distributed optimizer: (tp, pp, rank inside the
  distributed-optimizer instance), so replicas sit in
  ``get_inter_distributed_optimizer_instance_group()``; plain optimizer: (tp, pp), every
  DP x CP peer.
* ``optimizer_state_tensors``: the shard, in a fixed order, creating Adam's state on a
  fresh (replacement) optimizer so that received bytes can land in place.
* Model parameters are never shipped: they are the main params copied into the model
  (and all-gathered over the instance with the distributed optimizer), bit for bit what
  the original step produced.
"""

from __future__ import annotations

import pickle
import random
from typing import Any

import numpy as np
import torch

from .optimizer import leaf_optimizers


def shard_key(use_distributed_optimizer: bool) -> tuple[int, int, int]:
    """Equal keys <=> identical optimizer state (see module docstring)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_rank()
    pp = ps.get_pipeline_model_parallel_rank()
    if not use_distributed_optimizer:
        return (tp, pp, 0)
    intra = ps.get_data_parallel_rank(with_context_parallel=True, partial_data_parallel=True)
    return (tp, pp, intra)


def optimizer_state_tensors(optimizer: Any) -> list[torch.Tensor]:
    """Main params, exp_avg, exp_avg_sq and step of every param of this rank's shard."""
    out: list[torch.Tensor] = []
    for opt in leaf_optimizers(optimizer):
        inner = opt.optimizer
        for group in inner.param_groups:
            for main in group["params"]:
                state = inner.state[main]
                if "exp_avg" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(main, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(main,
                                                           memory_format=torch.preserve_format)
                out.extend((main.data, state["exp_avg"], state["exp_avg_sq"], state["step"]))
    return out


def copy_main_to_model(optimizer: Any) -> None:
    """Write this rank's main params into the model params (its shard, for DistOpt)."""
    for opt in leaf_optimizers(optimizer):
        opt._copy_main_params_to_model_params()


def capture_rng() -> dict[str, Any]:
    """Every random stream a step can touch (CPU, CUDA, megatron's TP tracker, numpy, random)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["tracker"].items()})
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def to_bytes(obj: Any) -> torch.Tensor:
    """A picklable object as a uint8 tensor (for small control payloads: RNG, counters)."""
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def from_bytes(tensor: torch.Tensor) -> Any:
    return pickle.loads(tensor.numpy().tobytes())
