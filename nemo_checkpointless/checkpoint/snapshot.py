"""What a durable checkpoint holds, as megatron sharded state dicts, and its host snapshot.

The state dict is megatron's own: every model chunk's ``sharded_state_dict()`` under
``model`` (``model0``, ``model1``, ... with virtual pipeline stages, as Megatron-LM names
them) and the optimizer's ``sharded_state_dict()`` under ``optimizer`` in the
``dp_reshardable`` format (fp32 main params, Adam moments and step of every
DistributedOptimizer bucket; reshardable over data parallelism). Why that format:

* ``dp_reshardable`` is what Megatron-LM writes by default; each rank writes its own
  shard, with no data exchange at save time, and a load at another data-parallel size
  re-slices the buckets (megatron's resharding on load).
* ``fully_reshardable`` all-gathers the whole optimizer state onto every data-parallel
  rank during the save (on the training thread, and the memory of a full replica per
  rank), and its loader fails with torch's Adam in megatron-core 0.16.1 (``KeyError:
  'step'`` in ``_set_main_param_and_optimizer_states``); ``fully_sharded_model_space``
  raises "ShardedTensor.flattened_range is not supported" in 0.16.1.

The package's own step state goes beside it: ``ncl`` in the common (rank 0) part: step,
consumed samples and the caller's ``extra_state`` (scheduler, last metrics record); and
``ncl_rank_state``, a ShardedObject with one entry per global rank (the RNG snapshot that
starts the next step: it differs between tensor- and pipeline-parallel ranks).

:class:`HostSnapshot` copies the tensors this rank writes into host buffers allocated once
(pinned on a GPU) and points the state dict at them, so the write can run in the
background while training changes the live tensors.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import device

SHARDING = {
    "distrib_optim_sharding_type": "dp_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}
COMMON_KEY = "ncl"
RANK_KEY = "ncl_rank_state"
CHECKPOINT_VERSION = 3.0  # Megatron-LM's checkpoint_version for dist checkpoints


def sharding_metadata() -> dict[str, Any]:
    """``metadata`` for megatron's ``sharded_state_dict`` calls (with the live DP group)."""
    from megatron.core import parallel_state as ps

    return {**SHARDING, "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)


def model_state(chunks: list[torch.nn.Module], metadata: dict[str, Any]) -> dict[str, Any]:
    """Every chunk's sharded state dict under Megatron-LM's key names."""
    from megatron.core import parallel_state as ps

    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict(metadata=metadata)}
    before = ps.get_virtual_pipeline_model_parallel_rank()
    out = {}
    try:
        for i, chunk in enumerate(chunks):
            ps.set_virtual_pipeline_model_parallel_rank(i)
            out[f"model{i}"] = unwrap(chunk).sharded_state_dict(metadata=metadata)
    finally:
        ps.set_virtual_pipeline_model_parallel_rank(before)
    return out


def rank_object(rank_state: Any) -> Any:
    """This rank's entry of the per-rank state (``None`` to load it)."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing import ShardedObject

    world, rank = dist.get_world_size(), dist.get_rank()
    return ShardedObject(RANK_KEY, rank_state, (world,), (rank,), replica_id=0)


def state_dict(chunks: list[torch.nn.Module], optimizer: Any, *, is_loading: bool,
               rank_state: Any = None, with_rank_state: bool = True) -> dict[str, Any]:
    """megatron's sharded state dict of the model chunks and the optimizer, plus this
    rank's own state object."""
    from ..compat.megatron_checkpoint import adapt_dp_reshardable_steps

    adapt_dp_reshardable_steps()  # megatron-core 0.15 with torch's Adam (once per process)
    metadata = sharding_metadata()
    sd = model_state(chunks, metadata)
    sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading,
                                                   metadata=metadata)
    if with_rank_state:
        sd[RANK_KEY] = rank_object(rank_state)
    return sd


def current_layout(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """The parallel layout a checkpoint is written at (compared on load)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ddp = getattr(chunks[0], "ddp_config", None)
    return {
        "world_size": dist.get_world_size(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "vp": ps.get_virtual_pipeline_model_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "use_distributed_optimizer": bool(getattr(ddp, "use_distributed_optimizer", False)),
        "num_distributed_optimizer_instances":
            int(getattr(ddp, "num_distributed_optimizer_instances", 1)),
    }


MODEL_AXES = ("tp", "pp", "vp", "cp", "ep", "use_distributed_optimizer")


def layout_difference(saved: dict[str, Any], current: dict[str, Any]) -> tuple[bool, list[str]]:
    """(same layout?, model-parallel mismatches that no load can bridge)."""
    same = all(saved.get(k) == current.get(k) for k in current)
    blocking = [f"{k}: checkpoint {saved.get(k)}, this job {current.get(k)}"
                for k in MODEL_AXES if saved.get(k) != current.get(k)]
    return same, blocking


class HostSnapshot:
    """Host copies of the tensors this rank writes, in buffers allocated once and reused
    (pinned when the state lives on a GPU: one asynchronous copy each, one wait)."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self.nbytes = 0

    def take(self, sharded_part: Any) -> int:
        """Point every main-replica ShardedTensor of ``sharded_part`` at a host copy of its
        data; return the bytes copied."""
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

        pinned = device.is_cuda()
        total = 0
        i = 0
        for sh in nested_values(sharded_part):
            if not isinstance(sh, ShardedTensor) or not is_main_replica(sh.replica_id):
                continue
            src = sh.data
            buf = self._buffer(i, src, pinned)
            buf.copy_(src.detach(), non_blocking=pinned)
            sh.data = buf
            total += buf.numel() * buf.element_size()
            i += 1
        del self._buffers[i:]
        if pinned:
            torch.cuda.current_stream().synchronize()
        self.nbytes = total
        return total

    def _buffer(self, i: int, like: torch.Tensor, pinned: bool) -> torch.Tensor:
        if i < len(self._buffers):
            buf = self._buffers[i]
            if buf.shape == like.shape and buf.dtype == like.dtype:
                return buf
        # host: the snapshot a background thread writes to storage (pinned on a GPU host)
        buf = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pinned)
        if i < len(self._buffers):
            self._buffers[i] = buf
        else:
            self._buffers.append(buf)
        return buf


def check_plain(value: Any, where: str = "extra_state") -> None:
    """``common.pt`` is read with ``torch.load(weights_only=True)`` by megatron: refuse
    anything but dicts, lists, tuples, strings, numbers, booleans, None and tensors."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; use str or int")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for j, v in enumerate(value):
            check_plain(v, f"{where}[{j}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}: the common part of a durable "
                    "checkpoint holds only dicts, lists, strings, numbers and tensors (put "
                    "other per-rank objects in rank_state)")

