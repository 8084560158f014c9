"""megatron-core ``dist_checkpointing`` and torch DCP internals used by durable checkpoints.

The durable checkpoints (``nemo_checkpointless/checkpoint/``) are written in megatron-core's
``torch_dist`` format with megatron's own planner, so that stock tools read them, but the
bytes are written by our background thread and the checkpoint is finalised by the
coordinator's thread from files (no collective off the training thread). That needs a few
private pieces of megatron-core 0.16 and torch 2.13, all kept here:

* :class:`PlanningStrategy`: megatron's ``TorchDistSaveShardedStrategy`` (with its plan and
  metadata caching), stopped after planning; the plan's write buckets and the global
  metadata are handed back instead of an ``AsyncRequest`` that would fork writer processes
  and finalise with collectives.
* megatron's planner asks for a results queue of a ``spawn``-context ``Manager`` (a server
  process per rank, started on the first save) that this path never uses:
  :func:`_no_results_queue` answers that request with a placeholder while planning.
* :func:`write_bucket`: torch's ``_write_item`` (one DCP item into an open stream).
* :func:`finish_metadata`: the coordinator's ``.metadata`` from every rank's write results.
* :func:`capture_optimizer_state` / :func:`restore_optimizer_state`: megatron 0.16's
  ``DistributedOptimizer`` load, with torch's Adam (no Apex/TE), replaces every per-param
  ``step`` by one tensor shared by all params and, in the ``dp_reshardable`` format, then
  copies into it the *live* optimizer's per-param step (kept as a non-persistent object),
  not the checkpoint's (measured: a reload into an optimizer at step 3 of a checkpoint of
  step 2 came back with step 3). The original state tensors (the flat, contiguous buffers
  peer replication relies on) are put back, holding the loaded values and the
  checkpoint's step from the param groups.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

BACKEND = ("torch_dist", 1)


@dataclass
class PlannedSave:
    """What planning produced on this rank: the storage writer (its ``write_buckets``
    name the files and items to write) and, on the coordinator, the global metadata."""

    writer: Any
    metadata: Optional[Any]

    @property
    def buckets(self) -> list:
        return list(self.writer.write_buckets or [])


def planning_strategy(parallel_group: Any) -> Any:
    """megatron's torch_dist save strategy stopped after planning, wrapped in its fully
    parallel save wrapper over ``parallel_group`` (main replicas of replicated tensors are
    spread over the data-parallel ranks instead of all landing on DP rank 0). Both cache
    their plans: from the third save on, planning needs no communication."""
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper)
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    class PlanningStrategy(TorchDistSaveShardedStrategy):
        planned: Optional[PlannedSave] = None

        def _get_save_and_finalize_callbacks(self, writer: Any, ret: Any) -> Any:
            self.planned = PlannedSave(writer=writer, metadata=ret[1])
            return None

    base = PlanningStrategy(*BACKEND, keep_only_main_replica=True, thread_count=1,
                            cached_metadata=True)
    return FullyParallelSaveStrategyWrapper(base, parallel_group, do_cache_distribution=True)


def distribute_main_replicas(strategy: Any, sharded_part: Any) -> None:
    """Decide which rank writes each replicated tensor (sets ``replica_id``)."""
    strategy.apply_saving_parallelization(sharded_part)


def plan(strategy: Any, sharded_part: Any, checkpoint_dir: Path) -> PlannedSave:
    """Plan the save of ``sharded_part`` (after :func:`distribute_main_replicas`); may be
    collective (first two saves of a strategy), so every rank calls it."""
    base = strategy.base_strategy
    base.planned = None
    with _no_results_queue():
        base.async_save(sharded_part, Path(checkpoint_dir))
    assert base.planned is not None
    return base.planned


def plan_is_cached(strategy: Any) -> bool:
    """Whether the next :func:`plan` needs no communication."""
    base = strategy.base_strategy
    return bool(base.validated_cache_reuse and base.cached_central_plan is not None
                and strategy.cached_distribution is not None)


@contextlib.contextmanager
def _no_results_queue() -> Iterator[None]:
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:  # pragma: no cover - other megatron-core layouts
        yield
        return
    if getattr(fa, "_results_queue", None) is not None:
        yield
        return
    fa._results_queue = _UnusedQueue()
    try:
        yield
    finally:
        fa._results_queue = None


class _UnusedQueue:
    """Stands in for megatron's writer-process results queue (never used here)."""

    def put(self, *_: Any, **__: Any) -> None:
        raise RuntimeError("durable checkpoints write in-process; no results queue")


def write_bucket(writer: Any, bucket: Any, stream: Any) -> list:
    """Write one planned bucket's items into ``stream``; return its DCP write results."""
    from torch.distributed.checkpoint.filesystem import _write_item

    _, storage_key, (bytes_data, tensor_data) = bucket
    extra: dict[str, Any] = {}
    if "serialization_format" in inspect.signature(_write_item).parameters:
        from torch.distributed.checkpoint.filesystem import SerializationFormat

        extra["serialization_format"] = SerializationFormat.TORCH_SAVE
    transforms = [writer.transforms] if hasattr(writer, "transforms") else []
    results = []
    for item, data in (*bytes_data, *tensor_data):
        results.append(_write_item(*transforms, stream, data, item, storage_key, **extra))
    return results


def bucket_file(bucket: Any) -> str:
    """The path a planned bucket is written to."""
    return str(bucket[0])


def finish_metadata(planned: PlannedSave, results: list[list]) -> None:
    """Coordinator: write DCP's ``.metadata`` from every rank's write results, then
    megatron's ``metadata.json`` (backend and version)."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    assert planned.metadata is not None, "only the coordinator finishes a checkpoint"
    planned.writer.finish(planned.metadata, results)
    save_config(CheckpointingConfig(*BACKEND), str(planned.writer.checkpoint_dir))


def capture_optimizer_state(optimizer: Any) -> list[tuple[Any, Any, dict[str, torch.Tensor]]]:
    """(inner torch optimizer, param, {state key: tensor}) for every main param, before a
    load replaces them (see the module docstring)."""
    from ..megatron.optimizer import leaf_optimizers

    kept = []
    for opt in leaf_optimizers(optimizer):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state.get(p)
                if state:
                    kept.append((inner, p, dict(state)))
    return kept


def restore_optimizer_state(kept: list[tuple[Any, Any, dict[str, torch.Tensor]]]) -> None:
    """Put the captured state tensors back, holding the loaded values; ``step`` from the
    checkpoint's param group (megatron stores one step per group there)."""
    with torch.no_grad():
        for inner, p, old in kept:
            group = next(g for g in inner.param_groups if any(q is p for q in g["params"]))
            new = inner.state[p]
            for key, tensor in old.items():
                if key == "step" and "step" in group:
                    tensor.fill_(float(group["step"]))
                elif key in new and new[key] is not tensor:
                    tensor.copy_(new[key])
                new[key] = tensor


def megatron_version() -> str:
    try:
        from megatron.core.package_info import __version__
    except ImportError:  # pragma: no cover
        return "unknown"
    return str(__version__)

