"""Find the newest complete, verified durable checkpoint, and load it into a live job.

:func:`latest_verified` is collective when a process group exists: rank 0 lists the
candidate checkpoints (newest first) and broadcasts the list; for each candidate every
rank reads the manifest and checks the size and SHA-256 of its share of the files (file
``i`` on rank ``i % world``), and one all-reduce (MIN) decides; a candidate that fails
anywhere is skipped with a warning naming it (and, on the rank that found it, the file
and what is wrong), and the next older one is tried. So every rank returns the same
checkpoint, and a damaged one can never send the job into a restart loop: it is passed
over, not retried.

:func:`load` is collective too (megatron's load plans over the world). At the layout the
checkpoint was written at it is exact: model, fp32 main params, Adam moments and step,
and each rank's own state. At another data-parallel size (or number of optimizer
instances) megatron re-slices the optimizer buckets on load and the per-rank state is not
returned; tensor, pipeline, context or expert parallel sizes must match.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from .. import device
from ..compat import megatron_checkpoint as mc
from . import manifest as mf
from . import snapshot as snap

log = logging.getLogger(__name__)


class CheckpointLayoutError(ValueError):
    """The checkpoint cannot be loaded at this job's model-parallel layout."""


@dataclass
class Restored:
    """What :func:`load` brought back besides the model and optimizer (loaded in place)."""

    info: mf.CheckpointInfo
    step: int
    consumed_samples: int
    extra_state: dict[str, Any]
    rank_state: Any  # None when resharded (another data-parallel size)
    resharded: bool
    seconds: float


def _collective(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and (
        group is not None or dist.get_world_size() > 1)


def latest_verified(root: Path | str, *, verify_data: bool = True,
                    group: Any = None) -> Optional[mf.CheckpointInfo]:
    """The newest checkpoint under ``root`` whose manifest and files verify on every rank,
    or None. Collective over ``group`` (default: the world) when a process group exists;
    call it on every rank."""
    root = Path(root)
    collective = _collective(group)
    rank = dist.get_rank(group) if collective else 0
    world = dist.get_world_size(group) if collective else 1
    names = [p.name for p in mf.candidates(root)]
    if collective:
        box = [names]
        dist.broadcast_object_list(box, src=_global_rank0(group), group=group)
        names = box[0]
    for name in names:
        directory = root / name
        problems = _verify_share(directory, rank, world, verify_data)
        if collective:
            flag = device.control_tensor([0 if problems else 1], torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
            good = bool(flag.item())
        else:
            good = not problems
        if good:
            found = mf.info(directory)
            if rank == 0:
                log.info("latest verified checkpoint: %s (step %d, %d consumed samples)",
                         directory, found.step, found.consumed_samples)
            return found
        for problem in problems:
            log.warning("checkpoint %s fails verification: %s", directory, problem)
        if rank == 0:
            log.warning("skipping checkpoint %s: its manifest or files do not verify (see "
                        "the ranks' warnings); trying the previous one", directory)
    return None


def _global_rank0(group: Any) -> int:
    return 0 if group is None else dist.get_global_rank(group, 0)


def _verify_share(directory: Path, rank: int, world: int, verify_data: bool) -> list[str]:
    try:
        manifest = mf.read(directory)
    except mf.ManifestError as err:
        return [str(err)]
    names = sorted(manifest["files"])
    if not verify_data:
        names = []
    return mf.verify_files(directory, manifest, names[rank::world])


def load(info: mf.CheckpointInfo, model: list[torch.nn.Module],
         optimizer: Any) -> Restored:
    """Load checkpoint ``info`` into the live ``model`` chunks and megatron ``optimizer``
    in place (collective); return the step, data position and the saved extra state."""
    from megatron.core import dist_checkpointing

    t0 = time.perf_counter()
    current = snap.current_layout(model)
    same, blocking = snap.layout_difference(info.layout, current)
    if blocking:
        raise CheckpointLayoutError(
            f"checkpoint {info.path} was written at another model-parallel layout ("
            + "; ".join(blocking) + "): only the data-parallel size may change on resume. "
            "Run with the checkpoint's layout, point checkpoint.dir elsewhere, or set "
            "checkpoint.resume=never to start fresh.")
    wanted = snap.SHARDING["distrib_optim_sharding_type"]
    if info.manifest.get("optimizer_format") != wanted:
        raise CheckpointLayoutError(
            f"checkpoint {info.path} holds optimizer format "
            f"{info.manifest.get('optimizer_format')!r}; this version reads {wanted!r}")
    kept = mc.capture_optimizer_state(optimizer)  # before megatron touches the state
    sd = snap.state_dict(model, optimizer, is_loading=True, with_rank_state=same)
    loaded = dist_checkpointing.load(sd, str(info.path))
    with torch.no_grad():  # fp32 main params are views of leaf params that need grad
        if len(model) == 1:
            snap.unwrap(model[0]).load_state_dict(loaded["model"])
        else:
            for i, chunk in enumerate(model):
                snap.unwrap(chunk).load_state_dict(loaded[f"model{i}"])
        optimizer.load_state_dict(loaded["optimizer"])
    mc.restore_optimizer_state(kept)
    common = loaded[snap.COMMON_KEY]
    if common["step"] != info.step:
        raise mf.ManifestError(f"{info.path}: common.pt holds step {common['step']}, the "
                               f"manifest {info.step}")
    seconds = time.perf_counter() - t0
    if not same and dist.get_rank() == 0:
        log.warning("resumed from %s at another data-parallel layout (checkpoint %s, this "
                    "job %s): the optimizer state was resharded; per-rank state (RNG) is "
                    "not restored and the run is not bit-exact with the original",
                    info.path, info.layout, current)
    return Restored(info=info, step=common["step"],
                    consumed_samples=int(common["extra"]["consumed_samples"]),
                    extra_state=common["extra"],
                    rank_state=loaded.get(snap.RANK_KEY) if same else None,
                    resharded=not same, seconds=seconds)
