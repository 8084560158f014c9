"""Small filesystem helpers for building shared caches safely from several processes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator


@contextlib.contextmanager
def file_lock(lock_path: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing) for the block.

    Works between processes of one machine (and on filesystems that support ``flock``).
    The lock is released when the block exits, including when the process dies.
    """
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def unique_tmp_name(path: str) -> str:
    """A sibling of ``path`` no other process will pick: ``<path>.tmp-<pid>-<random>``."""
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def fsync_file(path: str) -> None:
    """Flush a written file to disk so that a rename after it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def private_tmp_dir(parent: str) -> Iterator[str]:
    """A fresh directory inside ``parent`` (same filesystem, so renames out are atomic)."""
    os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=parent)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
