"""Periodic, asynchronous disk checkpoints: the fallback when no peer holds a shard.

Every ``interval`` steps each rank copies its state (the same tensors peer replication
ships: fp32 main params, Adam moments and step, plus RNG, counters and scheduler) into
host memory, and a background thread writes it with ``torch.distributed.checkpoint``
(``no_dist=True``: one directory per rank, no collective). A ``.done`` marker per rank,
written last, makes a checkpoint complete only when every rank's part is on disk.

Used by ``checkpointless=tier3`` (every failure rolls every rank back to the latest
checkpoint) and by ``checkpointless.fallback=disk`` under tier 4 (only when some shard has
no live replica).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed.checkpoint as dcp

from ..megatron.shards import from_bytes, to_bytes
from ..train.hooks import Phase

log = logging.getLogger(__name__)


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def complete_steps(root: Path, world_size: int) -> list[int]:
    """Steps whose checkpoint has every rank's part on disk, oldest first."""
    out = []
    for d in sorted(Path(root).glob("step_*")):
        if len(list(d.glob("rank_*.done"))) == world_size:
            out.append(int(d.name.split("_")[1]))
    return out


class AsyncCheckpointer:
    """Step hook writing this rank's part of a checkpoint every ``interval`` steps."""

    def __init__(self, root: Path, rank: int, world_size: int, interval: int,
                 tensors: Callable[[], Sequence[torch.Tensor]],
                 blob: Callable[[int], dict[str, Any]], keep: int = 2) -> None:
        self.root = Path(root)
        self.rank = rank
        self.world_size = world_size
        self.interval = interval
        self.keep = keep
        self._tensors = tensors
        self._blob = blob
        self._thread: Optional[threading.Thread] = None
        self.last_seconds = 0.0

    def on_phase(self, phase: Phase, step: int) -> None:
        if phase is Phase.AFTER_STEP and step % self.interval == 0:
            self.save(step)

    def save(self, step: int, wait: bool = False) -> None:
        """Snapshot now (a host copy), write in the background."""
        self.wait()
        snapshot = {f"t{i}": t.detach().clone() for i, t in enumerate(self._tensors())}
        snapshot["blob"] = to_bytes(self._blob(step))
        self._thread = threading.Thread(target=self._write, args=(step, snapshot),
                                        name="ncl-checkpoint", daemon=True)
        self._thread.start()
        if wait:
            self.wait()

    def _write(self, step: int, snapshot: dict[str, torch.Tensor]) -> None:
        t0 = time.perf_counter()
        target = step_dir(self.root, step)
        part = target / f"rank_{self.rank:05d}"
        dcp.save(snapshot, checkpoint_id=str(part), no_dist=True)
        (target / f"rank_{self.rank:05d}.done").write_text(str(time.time()))
        self.last_seconds = time.perf_counter() - t0
        if self.rank == 0:
            self._prune()

    def _prune(self) -> None:
        steps = complete_steps(self.root, self.world_size)
        for old in steps[:-self.keep]:
            shutil.rmtree(step_dir(self.root, old), ignore_errors=True)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def load_part(root: Path, step: int, rank: int, tensors: Sequence[torch.Tensor]) -> Any:
    """Load ``rank``'s part of checkpoint ``step`` into ``tensors``; return its blob."""
    part = step_dir(root, step) / f"rank_{rank:05d}"
    state = {f"t{i}": torch.empty_like(t) for i, t in enumerate(tensors)}
    meta = dcp.FileSystemReader(str(part)).read_metadata()
    blob_shape = meta.state_dict_metadata["blob"].size
    state["blob"] = torch.empty(blob_shape, dtype=torch.uint8)
    dcp.load(state, checkpoint_id=str(part), no_dist=True)
    for i, t in enumerate(tensors):
        t.copy_(state[f"t{i}"])
    return from_bytes(state["blob"])
