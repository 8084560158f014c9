"""The background half of a durable save: write this rank's files, report, finalise.

Runs on one thread per save, after the training thread has taken the host snapshot and
planned the save. No collective happens here (a collective off the training thread would
interleave with the step's own on the same groups); ranks meet through files instead:

1. Every rank writes its planned bucket files, hashing the bytes as they go out, syncs
   them, drops them from the page cache, and reports its DCP write results and file
   records in ``ncl_parts_<token>/rank_NNNNN.pkl`` (atomic rename). Rank 0 also writes
   ``common.pt``. ``token`` is agreed at the save, so reports of an earlier, abandoned
   save of the same step are never mistaken for this one's.
2. Rank 0's thread then waits for every rank's report (bounded by ``timeout_s`` and by
   :meth:`SaveJob.cancel`), writes DCP's ``.metadata`` and megatron's ``metadata.json``,
   and last the manifest, atomically; then megatron's ``latest_checkpointed_iteration.txt``
   and the pruning of old checkpoints.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..compat import megatron_checkpoint as mc
from . import manifest as mf

log = logging.getLogger(__name__)

COMMON_FILE = "common.pt"
POLL_S = 0.02


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HashingFile:
    """A write-only file that hashes (SHA-256) and counts the bytes written to it; on
    close it is flushed, synced and dropped from the page cache."""

    def __init__(self, path: str, buffer_bytes: int = 8 << 20) -> None:
        self.path = path
        self._file = open(path, "wb", buffering=buffer_bytes)
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._file.write(view)
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._file.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.flush()
        fd = self._file.fileno()
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
        self._file.close()

    def record(self, name: str) -> mf.FileRecord:
        return mf.FileRecord(name=name, bytes=self.size, sha256=self._hash.hexdigest())

    def __enter__(self) -> "HashingFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class SaveJob:
    """One save in flight on this rank."""

    root: Path
    step: int
    directory: Path
    planned: mc.PlannedSave
    rank: int
    world_size: int
    token: int
    common: Optional[dict[str, Any]]  # rank 0 only
    manifest_fields: dict[str, Any]
    keep: int
    timeout_s: float
    stats: dict[str, Any] = field(default_factory=dict)
    error: Optional[BaseException] = None
    complete: bool = False
    _cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def parts_dir(self) -> Path:
        return self.directory / f"{mf.PARTS_PREFIX}{self.token:016x}"

    def cancel(self) -> None:
        """Stop waiting for other ranks' reports (the checkpoint stays incomplete)."""
        self._cancel.set()

    def run(self) -> None:
        t0 = time.perf_counter()
        try:
            self._write_part()
            self.stats["write_s"] = time.perf_counter() - t0
            if self.rank == 0:
                self.complete = self._finalize()
                self.stats["finalize_s"] = time.perf_counter() - t0 - self.stats["write_s"]
        except BaseException as err:  # reported by wait(); training goes on
            self.error = err
            log.error("durable checkpoint of step %d (%s) failed on rank %d: %r; it stays "
                      "incomplete and is never loaded", self.step, self.directory,
                      self.rank, err)
        self.stats["total_s"] = time.perf_counter() - t0

    def _write_part(self) -> None:
        records, results = [], []
        for bucket in self.planned.buckets:
            path = mc.bucket_file(bucket)
            with HashingFile(path) as out:
                results.extend(mc.write_bucket(self.planned.writer, bucket, out))
            records.append(out.record(os.path.basename(path)))
        if self.common is not None:
            with HashingFile(str(self.directory / COMMON_FILE)) as out:
                torch.save(self.common, out)
            records.append(out.record(COMMON_FILE))
        self.stats["bytes"] = sum(r.bytes for r in records)
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        report = {"rank": self.rank, "results": results, "files": records}
        mf.write_atomic(self.parts_dir / f"rank_{self.rank:05d}.pkl", pickle.dumps(report))

    def finish_now(self) -> bool:
        """Rank 0, after every live rank's local write has ended: complete the checkpoint
        if every rank had reported, without waiting (see ``DurableCheckpointer.settle``)."""
        if self.complete or self.error is not None:
            return self.complete
        if not all((self.parts_dir / f"rank_{r:05d}.pkl").exists()
                   for r in range(self.world_size)):
            return False
        self.complete = self._finalize()
        return self.complete

    def _finalize(self) -> bool:
        reports = self._gather_reports()
        if reports is None:
            return False
        results = [r["results"] for r in reports]
        records = [rec for r in reports for rec in r["files"]]
        mc.finish_metadata(self.planned, results)
        for name in (".metadata", "metadata.json"):
            _fsync(self.directory / name)  # megatron does not sync metadata.json
            size, digest = mf.sha256_file(self.directory / name)
            records.append(mf.FileRecord(name=name, bytes=size, sha256=digest))
        self.stats["checkpoint_bytes"] = sum(r.bytes for r in records)
        manifest = mf.build(self.step, self.manifest_fields["consumed_samples"],
                            self.manifest_fields["layout"], records, mf.versions(),
                            extra={"optimizer_format": self.manifest_fields["optimizer_format"],
                                   "backend": "/".join(map(str, mc.BACKEND)),
                                   "written_at": time.time()})
        mf.write(self.directory, manifest)
        mf.write_tracker(self.root, self.step)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        removed = mf.prune(self.root, self.keep, protect=self.directory)
        if removed:
            log.info("pruned checkpoints %s (keeping %d)", [p.name for p in removed], self.keep)
        return True

    def _gather_reports(self) -> Optional[list[dict[str, Any]]]:
        deadline = time.monotonic() + self.timeout_s
        want = [self.parts_dir / f"rank_{r:05d}.pkl" for r in range(self.world_size)]
        while True:
            missing = [p for p in want if not p.exists()]
            if not missing:
                break
            if self._cancel.is_set():
                log.warning("durable checkpoint of step %d: stopped waiting for ranks %s "
                            "(recovery); it completes only if they had written their files",
                            self.step, [int(p.stem.split("_")[1]) for p in missing])
                return None
            if time.monotonic() > deadline:
                log.error("durable checkpoint of step %d: ranks %s did not report within "
                          "%.0fs (checkpoint.finalize_timeout_s); it stays incomplete",
                          self.step, [int(p.stem.split("_")[1]) for p in missing],
                          self.timeout_s)
                return None
            time.sleep(POLL_S)
        return [pickle.loads(p.read_bytes()) for p in want]
