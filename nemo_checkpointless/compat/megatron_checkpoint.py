"""megatron-core ``dist_checkpointing`` and torch DCP internals used by durable checkpoints.

The durable checkpoints (``nemo_checkpointless/checkpoint/``) are written in megatron-core's
``torch_dist`` format with megatron's own planner, so that stock tools read them, but the
bytes are written by our background thread and the checkpoint is finalised by the
coordinator's thread from files (no collective off the training thread). That needs a few
private pieces of megatron-core 0.16 and torch 2.13, all kept here:

* :class:`PlanningStrategy`: megatron's ``TorchDistSaveShardedStrategy`` (with its plan and
  metadata caching), stopped after planning; the plan's write buckets and the global
  metadata are handed back instead of an ``AsyncRequest`` that would fork writer processes
  and finalise with collectives. megatron-core 0.19 gives ``async_save`` an
  ``async_strategy`` (default ``nvrx``: nvidia-resiliency-ext's planner and writer, when
  installed) and passes it on to ``_get_save_and_finalize_callbacks``; the plan here is
  megatron's own (``mcore``) on every release that has the choice.
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
* :func:`adapt_dp_reshardable_steps`: megatron-core 0.16 and later keep torch Adam's
  per-parameter ``step`` (a 0-dim tensor) out of the ``dp_reshardable`` buckets (the step
  travels in the param groups; the load keeps the live one, as above). 0.15 treats it as a
  bucket slice and fails its shape assertion on every save and load once Adam's state
  exists (always, here: the state is created with the optimizer). Where a probe of the
  release's own ``sharded_param_state_dp_reshardable`` shows that, the step is left out of
  the buckets and a load keeps the live one: what 0.16 does.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ..device import HOST

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

        def _get_save_and_finalize_callbacks(self, writer: Any, ret: Any, *_: Any) -> Any:
            # (0.19 adds the async strategy's name)
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
    # megatron's own planner and writer where 0.19's default would be nvidia-resiliency-ext's
    own = ({"async_strategy": "mcore"}
           if "async_strategy" in inspect.signature(base.async_save).parameters else {})
    with _no_results_queue():
        base.async_save(sharded_part, Path(checkpoint_dir), **own)
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


def adapt_dp_reshardable_steps() -> bool:
    """Keep torch Adam's per-parameter ``step`` out of the ``dp_reshardable`` buckets where
    this megatron-core does not (see module doc). Idempotent; returns whether it applies."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as DO

    shard = DO.sharded_param_state_dp_reshardable
    if getattr(shard, "_ncl_without_steps", False):
        return True
    if _buckets_take_steps(shard) is not False:
        return False
    set_states = DO._set_main_param_and_optimizer_states

    @functools.wraps(shard)
    def sharded_param_state_dp_reshardable(self: Any, *args: Any, **kwargs: Any) -> Any:
        get = self.get_parameter_state_dp_reshardable
        self.get_parameter_state_dp_reshardable = lambda: _without_steps(get())
        try:
            return shard(self, *args, **kwargs)
        finally:
            del self.get_parameter_state_dp_reshardable

    @functools.wraps(set_states)
    def _set_main_param_and_optimizer_states(self: Any, model_param: Any, tensors: Any) -> Any:
        if "step" not in tensors:  # left out above: the live step stays (0.16's behaviour)
            group, order = self.model_param_group_index_map[model_param]
            main = self.optimizer.param_groups[group]["params"][order]
            live = self.optimizer.state.get(main, {}).get("step")
            if live is not None:
                tensors = {**tensors, "step": live}
        return set_states(self, model_param, tensors)

    sharded_param_state_dp_reshardable._ncl_without_steps = True  # type: ignore[attr-defined]
    DO.sharded_param_state_dp_reshardable = sharded_param_state_dp_reshardable  # type: ignore
    DO._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states  # type: ignore
    return True


def _without_steps(state: dict) -> dict:
    """The bucket state with 0-dim ``step`` entries dropped (in place)."""
    for gbuf_idx, by_dtype in state.items():
        if not isinstance(gbuf_idx, int):
            continue
        for buckets in by_dtype.values():
            for bucket in buckets:
                for tensors in bucket:
                    step = tensors.get("step")
                    if isinstance(step, torch.Tensor) and step.dim() == 0:
                        del tensors["step"]
    return state


def _buckets_take_steps(shard: Any) -> Optional[bool]:
    """Run the release's ``sharded_param_state_dp_reshardable`` on a one-parameter bucket,
    with and without a 0-dim ``step``: True if both pass, False if only the one without
    does, None if neither (the stand-in optimizer no longer fits this release)."""
    from types import SimpleNamespace

    class _OneRank:
        rank = staticmethod(lambda: 0)
        size = staticmethod(lambda: 1)

    def passes(with_step: bool) -> bool:
        # host tensors: the probe only builds a sharded state dict, no collective
        zeros = functools.partial(torch.zeros, 4, device=HOST)  # host: see above
        tensors: dict[str, Any] = {"param": zeros(), "exp_avg": zeros(),
                                   "gbuf_local_start": 0, "gbuf_local_end": 4}
        if with_step:
            tensors["step"] = torch.tensor(1.0, device=HOST)  # host: see above
        state = {"per_bucket_numel": [4], "per_bucket_numel_unpadded": [4],
                 0: {torch.float32: [[tensors]]}}
        stand_in = SimpleNamespace(
            data_parallel_group=_OneRank(), data_parallel_group_idx=0,
            distributed_optimizer_instance_id=0, gbuf_ranges=[{torch.float32: [{}]}],
            buffers=[SimpleNamespace(buckets=[SimpleNamespace(numel_unpadded=4,
                                                              grad_data=zeros())])],
            get_parameter_state_dp_reshardable=lambda: state)
        try:
            shard(stand_in, {}, is_loading=False, metadata=None)
        except Exception:  # noqa: BLE001 - the answer is whether it passes
            return False
        return True

    without, with_ = passes(False), passes(True)
    if not without:
        return None
    return with_
