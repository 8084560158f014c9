"""Shared-memory step cache: one file per (job, data coordinate, step), written atomically.

Layout under the cache root (``checkpointless.data_cache.path``, ``/dev/shm`` by default)::

    <root>/ncl-data-<job_id>/dp<D>-cp<C>-pp<P>/step-<step:010d>.batch
                                              /loader.lock   (flock: who is the loader)
                                              /DISABLED      (the loader could not write)

A step file holds the micro-batches of one data-parallel coordinate for one step::

    offset  size  field
    0       8     magic            b"NCLBATCH"
    8       2     version          u16, FORMAT_VERSION
    10      2     flags            u16, 0
    12      4     meta_len         u32, bytes of the JSON meta that follows the fixed header
    16      8     payload_len      u64, bytes of tensor data
    24      4     checksum         u32, zlib.crc32 of bytes 0..23, the meta and the payload
    28      4     reserved
    32      .     meta (UTF-8 JSON): job_id, config_hash, coord {dp, cp, pp}, step,
                  consumed_samples, tensors [[micro_batch, key, dtype, shape, offset,
                  nbytes, stored]]
    align64 .     payload: raw little-endian tensor bytes, each 64-byte aligned; integer
                  tensors are stored in the narrowest of uint8/uint16/int16/int32 that
                  holds them exactly (``stored``; empty = as is) and widened on read

Files are written to a private temporary name and published with ``os.replace``, so a
reader sees either no file or a whole one. :meth:`ShmStepCache.read` memory-maps a file,
checks the header (job id, config hash, coordinate, step) and the checksum, and raises
:class:`StaleOrCorrupt` with the reason rather than return data it cannot vouch for.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import mmap
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy
import torch

MAGIC = b"NCLBATCH"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<8sHHIQI4x")  # magic, version, flags, meta_len, payload_len, crc32
_ALIGN = 64
_STEP_RE = re.compile(r"^step-(\d{10})\.batch$")
LOCK_NAME = "loader.lock"
DISABLED_NAME = "DISABLED"
TMP_MAX_AGE_S = 60.0
"""Temporary files older than this are leftovers of a writer that died; pruning removes them."""

Batches = list[dict[str, torch.Tensor]]

# Loader locks this process holds: lock path -> (descriptor, holders). flock is per open
# file, so two objects of one process must share a descriptor, not contend for the lock.
_HELD: dict[str, tuple[int, int]] = {}
_HELD_LOCK = threading.Lock()


class StaleOrCorrupt(ValueError):
    """A step file exists but must not be used; ``str(err)`` says why."""


@dataclass(frozen=True)
class DataCoordinate:
    """The data-parallel coordinate a loader serves: all TP ranks of it need the same data."""

    dp: int
    cp: int
    pp: int

    @property
    def name(self) -> str:
        return f"dp{self.dp}-cp{self.cp}-pp{self.pp}"

    def as_dict(self) -> dict[str, int]:
        return {"dp": self.dp, "cp": self.cp, "pp": self.pp}


def safe_job_id(job_id: str) -> str:
    """``job_id`` as a file-name component: ``[A-Za-z0-9._-]``, at most 64 characters."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", job_id)[:48].strip(".")
    if clean != job_id or not clean:
        clean = f"{clean}-{hashlib.sha256(job_id.encode()).hexdigest()[:12]}"
    return clean


def job_cache_dir(root: str, job_id: str) -> str:
    """The directory holding every coordinate's step files of one job."""
    root = os.path.abspath(os.path.expanduser(root))
    return os.path.join(root, f"ncl-data-{safe_job_id(job_id)}")


def remove_job_cache(root: str, job_id: str) -> None:
    """Delete a job's cache (call when the job ends; files in /dev/shm use memory)."""
    import shutil

    shutil.rmtree(job_cache_dir(root, job_id), ignore_errors=True)


def config_fingerprint(fields: Mapping[str, Any], files: Sequence[str] = ()) -> str:
    """sha256 over what determines the cached bytes: config ``fields`` and ``files`` identity.

    Each file contributes its real path, size and modification time, so a dataset rebuilt
    in place (same path, new content) gives a new fingerprint.
    """
    digest = hashlib.sha256(f"ncl-data-cache-v{FORMAT_VERSION}\0".encode())
    digest.update(json.dumps(dict(fields), sort_keys=True, default=str).encode())
    for path in files:
        st = os.stat(path)
        digest.update(f"\0{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()


# -- encoding -----------------------------------------------------------------------------


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


_NARROW = (numpy.uint8, numpy.uint16, numpy.int16, numpy.int32)
"""Storage types tried, in order, for int32/int64 tensors (token ids, positions): the first
that holds every value exactly. Decoding widens back to the original dtype."""


def _stored(t: torch.Tensor) -> tuple[numpy.ndarray, str]:
    """The bytes to store for ``t`` (narrowed if an integer type allows) and their dtype."""
    if t.dtype in (torch.int64, torch.int32) and t.numel():
        lo, hi = int(t.min()), int(t.max())
        for candidate in _NARROW:
            info = numpy.iinfo(candidate)
            if info.min <= lo and hi <= info.max and info.bits < t.element_size() * 8:
                return t.numpy().reshape(-1).astype(candidate), numpy.dtype(candidate).name
    return t.reshape(-1).view(torch.uint8).numpy(), ""


def encode(meta: dict[str, Any], batches: Batches) -> list[bytes | memoryview]:
    """The chunks of a step file (header, meta, payload pieces) for ``batches``."""
    tensors: list[list[Any]] = []
    pieces: list[tuple[int, memoryview]] = []
    offset = 0
    for index, batch in enumerate(batches):
        for key, tensor in batch.items():
            t = tensor.detach().to("cpu").contiguous()
            array, stored = _stored(t)
            raw = memoryview(array).cast("B")
            offset = _align(offset)
            dtype = str(t.dtype).removeprefix("torch.")
            tensors.append([index, key, dtype, list(t.shape), offset, raw.nbytes, stored])
            pieces.append((offset, raw))
            offset += raw.nbytes
    meta = {**meta, "num_micro_batches": len(batches), "tensors": tensors}
    meta_bytes = json.dumps(meta, sort_keys=True).encode()
    payload_start = _align(_FIXED.size + len(meta_bytes))
    meta_pad = b"\0" * (payload_start - _FIXED.size - len(meta_bytes))
    chunks: list[bytes | memoryview] = [meta_bytes, meta_pad]
    position = 0
    for start, raw in pieces:
        chunks.append(b"\0" * (start - position))
        chunks.append(raw)
        position = start + raw.nbytes
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, 0, len(meta_bytes), position, 0)
    crc = zlib.crc32(fixed[:24])
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, 0, len(meta_bytes), position, crc)
    return [fixed, *chunks]


def decode(buf: memoryview, expect: Mapping[str, Any]) -> Batches:
    """Parse and verify a step file's bytes; raise :class:`StaleOrCorrupt` with the reason.

    ``expect`` holds the meta fields that must match (job_id, config_hash, coord, step,
    consumed_samples).
    """
    if buf.nbytes < _FIXED.size:
        raise StaleOrCorrupt(f"truncated: {buf.nbytes} bytes, the header alone is {_FIXED.size}")
    magic, version, _flags, meta_len, payload_len, crc = _FIXED.unpack_from(buf, 0)
    if magic != MAGIC:
        raise StaleOrCorrupt(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise StaleOrCorrupt(f"format version {version}, this code reads {FORMAT_VERSION}")
    payload_start = _align(_FIXED.size + meta_len)
    if payload_start + payload_len != buf.nbytes:
        raise StaleOrCorrupt(
            f"length mismatch: header says {payload_start + payload_len} bytes, "
            f"file has {buf.nbytes}"
        )
    actual = zlib.crc32(buf[payload_start:], zlib.crc32(buf[_FIXED.size:payload_start],
                                                        zlib.crc32(buf[:24])))
    if actual != crc:
        raise StaleOrCorrupt(f"checksum mismatch: header {crc:#010x}, content {actual:#010x}")
    try:
        meta = json.loads(bytes(buf[_FIXED.size:_FIXED.size + meta_len]))
    except ValueError as err:  # only reachable if the checksum collides
        raise StaleOrCorrupt(f"unreadable meta: {err}") from None
    for key, value in expect.items():
        if meta.get(key) != value:
            raise StaleOrCorrupt(f"{key} is {meta.get(key)!r}, expected {value!r}")
    batches: Batches = [{} for _ in range(meta["num_micro_batches"])]
    for index, key, dtype, shape, offset, nbytes, stored in meta["tensors"]:
        if nbytes == 0:
            batches[index][key] = torch.empty(shape, dtype=getattr(torch, dtype))
            continue
        start = payload_start + offset
        if stored:  # a narrowed integer tensor: widen back
            raw = numpy.frombuffer(buf, dtype=stored, count=nbytes // numpy.dtype(stored).itemsize,
                                   offset=start)
            tensor = torch.from_numpy(raw.astype(dtype)).reshape(shape)
        else:
            raw = numpy.frombuffer(buf, dtype=numpy.uint8, count=nbytes, offset=start)
            tensor = torch.from_numpy(raw.copy()).view(getattr(torch, dtype)).reshape(shape)
        batches[index][key] = tensor
        del raw  # drop the view of the mapping before it is closed
    return batches


# -- the cache ----------------------------------------------------------------------------


class ShmStepCache:
    """Step files of one job and data coordinate: atomic write, verified mmap read, prune.

    Args:
        root: cache root directory (``/dev/shm``); the job and coordinate directories are
            created below it.
        job_id: the job's id; all TP ranks of a coordinate must pass the same one.
        config_hash: :func:`config_fingerprint` of what determines the batch bytes.
        coord: the data coordinate served.
    """

    def __init__(self, root: str, job_id: str, config_hash: str, coord: DataCoordinate) -> None:
        self.job_id = job_id
        self.config_hash = config_hash
        self.coord = coord
        self.dir = os.path.join(job_cache_dir(root, job_id), coord.name)
        self._lock_fd: Optional[int] = None

    # paths
    def path(self, step: int) -> str:
        return os.path.join(self.dir, f"step-{step:010d}.batch")

    def _expect(self, step: int, consumed_samples: int) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "config_hash": self.config_hash,
            "coord": self.coord.as_dict(),
            "step": step,
            "consumed_samples": consumed_samples,
        }

    # write side
    def probe(self) -> None:
        """Create the directory and write + delete a probe file; raise OSError if not possible."""
        os.makedirs(self.dir, exist_ok=True)
        probe = os.path.join(self.dir, f".probe-{os.getpid()}")
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, [b"\0" * 4096])
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(probe)

    def write(self, step: int, consumed_samples: int, batches: Batches) -> int:
        """Publish ``batches`` as the file of ``step`` atomically; return its size in bytes.

        Raises OSError (ENOSPC, EACCES, ...) after removing the temporary file.
        """
        chunks = encode(self._expect(step, consumed_samples), batches)
        final = self.path(step)
        tmp = os.path.join(
            self.dir, f".tmp-{os.getpid()}-{os.urandom(4).hex()}-{os.path.basename(final)}")
        os.makedirs(self.dir, exist_ok=True)  # the job's files may have been removed
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                size = _write_all(fd, chunks)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return size

    # read side
    def read(self, step: int, consumed_samples: int) -> Batches:
        """The verified batches of ``step``.

        Raises:
            FileNotFoundError: no file for this step (not written yet, or pruned).
            StaleOrCorrupt: a file exists but belongs to another job/config/coordinate/step
                or fails its checksum.
        """
        fd = os.open(self.path(step), os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise StaleOrCorrupt("empty file")
            with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
                view = memoryview(mm)
                try:
                    return decode(view, self._expect(step, consumed_samples))
                finally:
                    view.release()
        finally:
            os.close(fd)

    def discard(self, step: int) -> None:
        """Remove the file of ``step`` if present (a rejected file before its rebuild)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(step))

    def steps(self) -> list[int]:
        """Steps with a published file, ascending."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in map(_STEP_RE.match, names) if m)

    def prune(self, keep_from: int, keep_to: Optional[int] = None) -> int:
        """Delete step files outside ``[keep_from, keep_to]`` and dead writers' temp files."""
        removed = 0
        now = time.time()
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return 0
        for entry in entries:
            m = _STEP_RE.match(entry.name)
            try:
                if m:
                    step = int(m.group(1))
                    if step < keep_from or (keep_to is not None and step > keep_to):
                        os.unlink(entry.path)
                        removed += 1
                elif entry.name.startswith(".tmp-") and now - entry.stat().st_mtime > TMP_MAX_AGE_S:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass
        return removed

    # loader role
    def try_lock(self) -> bool:
        """Take the loader role if no live process holds it (``flock``, freed when it dies).

        Re-entrant within a process: a second cache object of this process for the same
        coordinate (a trainer rebuilt in place) shares the lock instead of waiting on it.
        """
        if self._lock_fd is not None:
            return True
        path = os.path.join(self.dir, LOCK_NAME)
        with _HELD_LOCK:
            held = _HELD.get(path)
            if held is not None:
                _HELD[path] = (held[0], held[1] + 1)
                self._lock_fd = held[0]
                return True
            try:
                os.makedirs(self.dir, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # EWOULDBLOCK: a live loader holds it (or no flock here)
                os.close(fd)
                return False
            _HELD[path] = (fd, 1)
            self._lock_fd = fd
            return True

    def unlock(self) -> None:
        """Give the loader role up (the last holder in this process closes the descriptor)."""
        if self._lock_fd is None:
            return
        path = os.path.join(self.dir, LOCK_NAME)
        with _HELD_LOCK:
            fd, count = _HELD.pop(path, (self._lock_fd, 1))
            if count > 1:
                _HELD[path] = (fd, count - 1)
            else:
                os.close(fd)  # closing the descriptor releases the flock
        self._lock_fd = None

    # disabled marker
    def mark_disabled(self, reason: str) -> None:
        """Tell readers the loader cannot write (best effort: the disk may be full)."""
        with contextlib.suppress(OSError):
            fd = os.open(os.path.join(self.dir, DISABLED_NAME),
                         os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                with contextlib.suppress(OSError):
                    os.write(fd, reason.encode()[:4096])
            finally:
                os.close(fd)

    def clear_disabled(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.dir, DISABLED_NAME))

    def is_disabled(self) -> bool:
        return os.path.exists(os.path.join(self.dir, DISABLED_NAME))


def _write_all(fd: int, chunks: Sequence[bytes | memoryview]) -> int:
    """``os.write`` every chunk completely (the one place the cache writes bytes)."""
    total = 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while view.nbytes:
            n = os.write(fd, view)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            view = view[n:]
            total += n
    return total
