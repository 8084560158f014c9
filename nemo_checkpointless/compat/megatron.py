"""megatron-core internals the optimizer step relies on, behind stable names.

* :func:`step_with_ready_grads`: the update of a prepared step without the param
  all-gather that ``DistributedOptimizer.step_with_ready_grads`` appends (the commit point
  of the step; AWS patches the same place).
* :func:`local_all_gather_object`: megatron's optimizer constructor all-gathers every
  rank's param-group keys over the world; a replacement that joins healthy ranks answers it
  locally (every rank of a dense GPT has the same keys).
* :func:`start_param_sync`: the DDP param all-gather, forced synchronous.

Each is found by feature detection; :func:`missing_features` lists what this megatron-core
lacks (the start-up check names the supported versions when the list is not empty).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


def step_with_ready_grads(opt: Any) -> None:
    """Adam on the local shard, then main -> model params; no collective."""
    from megatron.core.optimizer.optimizer import MixedPrecisionOptimizer

    if isinstance(opt, MixedPrecisionOptimizer):
        MixedPrecisionOptimizer.step_with_ready_grads(opt)
    else:
        opt.step_with_ready_grads()


@contextlib.contextmanager
def local_all_gather_object() -> Iterator[None]:
    """``torch.distributed.all_gather_object`` answered with this rank's own object."""
    original = torch.distributed.all_gather_object

    def local(object_list: list, obj: Any, group: Any = None) -> None:
        for i in range(len(object_list)):
            object_list[i] = obj

    torch.distributed.all_gather_object = local
    try:
        yield
    finally:
        torch.distributed.all_gather_object = original


def start_param_sync(chunk: Any) -> None:
    """All-gather a DDP chunk's updated parameter shards now."""
    chunk.start_param_sync(force_sync=True)


def missing_features() -> list[str]:
    """The internals above that this megatron-core does not have."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer.optimizer import MixedPrecisionOptimizer

    missing = []
    if not hasattr(MixedPrecisionOptimizer, "step_with_ready_grads"):
        missing.append("MixedPrecisionOptimizer.step_with_ready_grads")
    if not hasattr(DistributedDataParallel, "start_param_sync"):
        missing.append("DistributedDataParallel.start_param_sync")
    return missing
