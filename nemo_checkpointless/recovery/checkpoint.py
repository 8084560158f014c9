"""Periodic, asynchronous disk checkpoints: the fallback when no peer holds a shard.

Every ``interval`` steps each rank copies its state (the same tensors peer replication
ships: fp32 main params, Adam moments and step, plus RNG, counters and scheduler) into one
flat host buffer, allocated once and reused (no allocation or page faults per checkpoint),
and a background thread writes it with ``torch.distributed.checkpoint`` (``no_dist=True``:
one directory per rank, no collective; one flat item keeps dcp's per-item planning cost
out of the step). A ``.done`` marker per rank,
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
        self._buffer: Optional[torch.Tensor] = None
        self.last_seconds = 0.0

    def on_phase(self, phase: Phase, step: int) -> None:
        if phase is Phase.AFTER_STEP and step % self.interval == 0:
            self.save(step)

    def save(self, step: int, wait: bool = False) -> None:
        """Snapshot now (a host copy), write in the background."""
        self.wait()  # the previous write is done with the buffer
        tensors = list(self._tensors())
        total = sum(t.numel() * t.element_size() for t in tensors)
        if self._buffer is None or self._buffer.numel() != total:
            self._buffer = torch.zeros(total, dtype=torch.uint8)
        pos = 0
        for t in tensors:
            flat = _bytes_of(t)
            self._buffer[pos:pos + flat.numel()].copy_(flat)
            pos += flat.numel()
        snapshot = {"state": self._buffer, "blob": to_bytes(self._blob(step))}
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
    meta = dcp.FileSystemReader(str(part)).read_metadata().state_dict_metadata
    total = sum(t.numel() * t.element_size() for t in tensors)
    if tuple(meta["state"].size) != (total,):
        raise ValueError(f"checkpoint {part} holds {tuple(meta['state'].size)[0]} state bytes, "
                         f"this rank's optimizer shard has {total}: was it written with another "
                         "model or parallel layout?")
    state = {"state": torch.empty(total, dtype=torch.uint8),
             "blob": torch.empty(meta["blob"].size, dtype=torch.uint8)}
    dcp.load(state, checkpoint_id=str(part), no_dist=True)
    pos = 0
    for t in tensors:
        flat = _bytes_of(t)
        flat.copy_(state["state"][pos:pos + flat.numel()])
        pos += flat.numel()
    return from_bytes(state["blob"])


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a flat uint8 view (writes go to the tensor)."""
    if not t.is_contiguous():
        raise ValueError("checkpointed state tensors must be contiguous")
    return t.detach().reshape(-1).view(torch.uint8)
