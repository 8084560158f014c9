"""Per-rank flat checkpoints of the checkpoint-restart baseline (the lab's, not tier 3's).

The product's durable checkpoints are ``nemo_checkpointless/checkpoint/`` (megatron-core's
format, read by stock tools); tier 3 and ``fallback=disk`` roll back to those. This module
is what the baseline in :mod:`.restart` writes, as jobs do today without this package.

Every ``interval`` steps each rank copies its state (the same tensors peer replication
ships: fp32 main params, Adam moments and step, plus RNG, counters and scheduler) into one
flat, page-aligned host buffer, allocated once and reused (no allocation or page faults
per checkpoint), and a background thread writes it. Two formats:

- ``raw`` (tier 3's format until it moved to durable checkpoints; kept as an option of the
  baseline): one file per rank, ``rank_NNNNN.ncl``: a 4 KiB header (magic,
  JSON with the byte counts), the state bytes, the pickled blob. The snapshot is taken
  straight into the buffer the write goes from, and the write is one ``O_DIRECT`` system
  call that drops the GIL, so the only CPU a checkpoint costs is the snapshot copy. On the
  development machine that is ~3 ms of CPU for a 30 MB part, against ~17 ms through
  ``torch.distributed.checkpoint`` (planning, ``torch.save`` serialisation, a staging copy;
  ``scripts/bench/overhead.py`` measures what it does to step time). The part is a
  rank's flat shard: no other tool reads it anyway.
- ``dcp``: ``torch.distributed.checkpoint`` (``no_dist=True``: one directory per rank, no
  collective; one flat item keeps dcp's per-item planning cost out of the step), written
  through :class:`DirectFileSystem`. The checkpoint-restart baseline uses it, because it is
  what jobs do today.

Files are written with ``O_DIRECT`` where the filesystem allows it: bytes go from the
buffer to the device without being copied into the page cache (a buffered write of a
34 MB part cost the writer ~80 ms of CPU here, taken from training). A ``.done`` marker
per rank, written after the part is synced, makes a checkpoint complete only when every
rank's part is on disk.

"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import mmap
import os
import pickle
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import torch
import torch.distributed.checkpoint as dcp

from ..megatron.shards import from_bytes, to_bytes
from ..replication.transfer import nbytes
from ..steps import Phase

log = logging.getLogger(__name__)

ALIGN = 4096  # O_DIRECT: buffer address, file offset and length in whole blocks
MAGIC = b"NCLPART1"
FORMATS = ("raw", "dcp")


def _open_direct(path: str) -> Tuple[int, bool]:
    """Open ``path`` for writing with ``O_DIRECT`` where the filesystem allows it (not
    tmpfs); return the descriptor and whether the write is direct."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, 0o644), True
        except OSError:  # EINVAL: no O_DIRECT on this filesystem
            pass
    return os.open(path, flags, 0o644), False


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        view = view[os.write(fd, view):]


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class DirectWriter(io.RawIOBase):
    """A write-only file stream with ``O_DIRECT``: staged in an aligned block, written in
    whole blocks; on close the last block is padded, the file cut to its true length and
    synced. Falls back to a buffered file where the filesystem refuses ``O_DIRECT``
    (tmpfs)."""

    BLOCK = 4 << 20

    def __init__(self, path: str) -> None:
        super().__init__()
        self._fd, self.direct = _open_direct(path)
        self._block = mmap.mmap(-1, self.BLOCK)  # page-aligned staging memory
        self._fill = 0
        self._pos = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n, done = len(view), 0
        while done < n:
            take = min(self.BLOCK - self._fill, n - done)
            self._block[self._fill:self._fill + take] = view[done:done + take]
            self._fill += take
            done += take
            if self._fill == self.BLOCK:
                _write_all(self._fd, memoryview(self._block))
                self._fill = 0
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._fill:
                size = self._fill
                if self.direct:  # a direct write is a multiple of the alignment
                    size = _aligned(size)
                    self._block[self._fill:size] = bytes(size - self._fill)
                _write_all(self._fd, memoryview(self._block)[:size])
                os.ftruncate(self._fd, self._pos)
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._block.close()
            super().close()


class DirectFileSystem(dcp.filesystem.FileSystem):
    """dcp's local file system, writing through :class:`DirectWriter`."""

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[io.IOBase]:
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        stream = DirectWriter(str(path))
        try:
            yield stream
        finally:
            stream.close()


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def complete_steps(root: Path, world_size: int) -> list[int]:
    """Steps whose checkpoint has every rank's part on disk, oldest first."""
    out = []
    for d in sorted(Path(root).glob("step_*")):
        if len(list(d.glob("rank_*.done"))) == world_size:
            out.append(int(d.name.split("_")[1]))
    return out


def part_path(root: Path, step: int, rank: int) -> Path:
    """A rank's part of checkpoint ``step``: ``rank_NNNNN.ncl`` (raw) or a dcp directory
    ``rank_NNNNN``."""
    return step_dir(root, step) / f"rank_{rank:05d}"


class AsyncCheckpointer:
    """Step hook writing this rank's part of a checkpoint every ``interval`` steps."""

    def __init__(self, root: Path, rank: int, world_size: int, interval: int,
                 tensors: Callable[[], Sequence[torch.Tensor]],
                 blob: Callable[[int], dict[str, Any]], keep: int = 2,
                 fmt: str = "raw") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"checkpoint format {fmt!r}: use one of {', '.join(FORMATS)}")
        self.root = Path(root)
        self.rank = rank
        self.world_size = world_size
        self.interval = interval
        self.keep = keep
        self.fmt = fmt
        self._tensors = tensors
        self._blob = blob
        self._thread: Optional[threading.Thread] = None
        self._map: Optional[mmap.mmap] = None  # page-aligned: a direct write goes from it
        self._buffer: Optional[torch.Tensor] = None  # the map as uint8
        self.last_seconds = 0.0

    def on_phase(self, phase: Phase, step: int) -> None:
        if phase is Phase.AFTER_STEP and step % self.interval == 0:
            self.save(step)

    def save(self, step: int, wait: bool = False) -> None:
        """Snapshot now (a host copy), write in the background."""
        self.wait()  # the previous write is done with the buffer
        tensors = list(self._tensors())
        state = nbytes(tensors)
        if self.fmt == "raw":
            blob = pickle.dumps(self._blob(step))
            header = MAGIC + json.dumps({"state_bytes": state, "blob_bytes": len(blob),
                                         "step": step}).encode()
            if len(header) > ALIGN:
                raise ValueError(f"checkpoint header of {len(header)} bytes exceeds {ALIGN}")
            size = ALIGN + state + len(blob)
            buffer = self._reserve(size)
            buffer[:ALIGN].zero_()
            buffer[:len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
            self._pack(tensors, ALIGN)
            buffer[ALIGN + state:size].copy_(torch.frombuffer(bytearray(blob),
                                                              dtype=torch.uint8))
            target, args = self._write_raw, (step, size)
        else:
            self._reserve(state)
            self._pack(tensors, 0)
            snapshot = {"state": self._buffer[:state], "blob": to_bytes(self._blob(step))}
            target, args = self._write_dcp, (step, snapshot)
        self._thread = threading.Thread(target=self._timed, args=(target, step, args),
                                        name="ncl-checkpoint", daemon=True)
        self._thread.start()
        if wait:
            self.wait()

    def _reserve(self, size: int) -> torch.Tensor:
        """The snapshot buffer, at least ``size`` bytes; grown (never per checkpoint in
        steady state: 64 KiB of slack covers the blob's small changes)."""
        if self._buffer is None or self._buffer.numel() < size:
            self._map = mmap.mmap(-1, _aligned(size + (64 << 10)))
            self._buffer = torch.frombuffer(self._map, dtype=torch.uint8)
        return self._buffer

    def _pack(self, tensors: Sequence[torch.Tensor], pos: int) -> None:
        assert self._buffer is not None
        for t in tensors:
            flat = _bytes_of(t)
            self._buffer[pos:pos + flat.numel()].copy_(flat)
            pos += flat.numel()

    def _timed(self, target: Callable[..., None], step: int, args: tuple) -> None:
        t0 = time.perf_counter()
        step_dir(self.root, step).mkdir(parents=True, exist_ok=True)
        target(*args)
        (step_dir(self.root, step) / f"rank_{self.rank:05d}.done").write_text(str(time.time()))
        self.last_seconds = time.perf_counter() - t0
        if self.rank == 0:
            self._prune()

    def _write_raw(self, step: int, size: int) -> None:
        """One write from the snapshot buffer (the GIL is released for all of it)."""
        assert self._map is not None
        fd, direct = _open_direct(str(part_path(self.root, step, self.rank)) + ".ncl")
        try:
            _write_all(fd, memoryview(self._map)[:_aligned(size) if direct else size])
            if direct:
                os.ftruncate(fd, size)  # drop the padding of the last block
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_dcp(self, step: int, snapshot: dict[str, torch.Tensor]) -> None:
        writer = dcp.FileSystemWriter(str(part_path(self.root, step, self.rank)),
                                      sync_files=False)  # our streams sync
        writer.fs = DirectFileSystem()
        dcp.save(snapshot, storage_writer=writer, no_dist=True)

    def _prune(self) -> None:
        steps = complete_steps(self.root, self.world_size)
        for old in steps[:-self.keep]:
            shutil.rmtree(step_dir(self.root, old), ignore_errors=True)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _layout_error(part: Path, found: int, want: int) -> ValueError:
    return ValueError(f"checkpoint {part} holds {found} state bytes, this rank's optimizer "
                      f"shard has {want}: was it written with another model or parallel "
                      "layout?")


def load_part(root: Path, step: int, rank: int, tensors: Sequence[torch.Tensor]) -> Any:
    """Load ``rank``'s part of checkpoint ``step`` into ``tensors``; return its blob."""
    part = part_path(root, step, rank)
    raw = part.with_name(part.name + ".ncl")
    total = nbytes(tensors)
    if raw.exists():
        return _load_raw(raw, total, tensors)
    meta = dcp.FileSystemReader(str(part)).read_metadata().state_dict_metadata
    if tuple(meta["state"].size) != (total,):
        raise _layout_error(part, tuple(meta["state"].size)[0], total)
    state = {"state": torch.empty(total, dtype=torch.uint8),
             "blob": torch.empty(meta["blob"].size, dtype=torch.uint8)}
    dcp.load(state, checkpoint_id=str(part), no_dist=True)
    pos = 0
    for t in tensors:
        flat = _bytes_of(t)
        flat.copy_(state["state"][pos:pos + flat.numel()])
        pos += flat.numel()
    return from_bytes(state["blob"])


def _load_raw(path: Path, total: int, tensors: Sequence[torch.Tensor]) -> Any:
    """Read a raw part straight into the tensors' memory (no staging copy)."""
    with open(path, "rb", buffering=0) as f:
        head = f.read(ALIGN)
        if not head.startswith(MAGIC):
            raise ValueError(f"{path} is not a nemo-checkpointless checkpoint part "
                             f"(no {MAGIC.decode()} header): delete it or point "
                             "checkpointless.checkpoint_dir elsewhere")
        meta = json.loads(head[len(MAGIC):].rstrip(b"\0"))
        if meta["state_bytes"] != total:
            raise _layout_error(path, meta["state_bytes"], total)
        size = ALIGN + meta["state_bytes"] + meta["blob_bytes"]
        if os.fstat(f.fileno()).st_size != size:
            raise ValueError(f"{path} has {os.fstat(f.fileno()).st_size} bytes, its header "
                             f"says {size}: the part is damaged; delete its step directory "
                             "to fall back to the checkpoint before it")
        for t in tensors:
            view = memoryview(_bytes_of(t).numpy())
            while len(view):
                n = f.readinto(view)
                if not n:
                    raise ValueError(f"{path} ended early")
                view = view[n:]
        return pickle.loads(f.read(meta["blob_bytes"]))


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a flat uint8 view (writes go to the tensor)."""
    if not t.is_contiguous():
        raise ValueError("checkpointed state tensors must be contiguous")
    return t.detach().reshape(-1).view(torch.uint8)
