"""The manifest that makes a durable checkpoint complete, and the files it vouches for.

A checkpoint is a directory ``<root>/iter_NNNNNNN`` (megatron's naming) holding megatron's
``torch_dist`` files (``__R_0.distcp`` per rank, ``.metadata``, ``metadata.json``,
``common.pt``) and, written last, ``ncl_manifest.json``: step, consumed samples, parallel
layout, package and library versions, and the size and SHA-256 of every file. The
manifest is written to a temporary name, synced and renamed, so a directory without a
manifest that parses and verifies is an incomplete checkpoint, never a complete one. The
manifest carries its own SHA-256 (over its other fields), so a damaged manifest that
still parses as JSON is refused too.

Nothing here talks to other ranks: see ``restore.py`` for the collective choice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

log = logging.getLogger(__name__)

FORMAT = "nemo-checkpointless/durable/1"
MANIFEST = "ncl_manifest.json"
TRACKER = "latest_checkpointed_iteration.txt"  # megatron's pointer to the newest iteration
PARTS_PREFIX = "ncl_parts_"  # per-rank write results, removed once the manifest is written
_NAME = re.compile(r"^iter_(\d{7,})$")
_CHUNK = 8 << 20


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def step_of(path: Path) -> Optional[int]:
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class FileRecord:
    """One file of a checkpoint: its name inside the directory, size and SHA-256."""

    name: str
    bytes: int
    sha256: str


@dataclass
class CheckpointInfo:
    """A complete checkpoint found on disk (its manifest parsed and self-verified)."""

    path: Path
    step: int
    consumed_samples: int
    layout: dict[str, Any]
    manifest: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        return self.path.name


class ManifestError(ValueError):
    """A manifest that is missing, truncated, damaged or of another format."""


def sha256_file(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a file, read in 8 MiB chunks (hashlib drops the GIL)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(view)
            if not n:
                break
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def _body_digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def build(step: int, consumed_samples: int, layout: dict[str, Any],
          files: Iterable[FileRecord], versions: dict[str, str],
          extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The manifest of checkpoint ``step`` (with its own checksum)."""
    body: dict[str, Any] = {
        "format": FORMAT,
        "step": int(step),
        "consumed_samples": int(consumed_samples),
        "layout": dict(layout),
        "files": {f.name: {"bytes": f.bytes, "sha256": f.sha256}
                  for f in sorted(files, key=lambda r: r.name)},
        "versions": dict(versions),
        **(extra or {}),
    }
    return {**body, "sha256": _body_digest(body)}


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one:
    temporary name, fsync, rename, fsync of the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while len(view):
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    sync_dir(path.parent)


def sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def write(directory: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest into ``directory`` last and atomically (see module docstring)."""
    write_atomic(Path(directory) / MANIFEST, json.dumps(manifest, indent=1,
                                                        sort_keys=True).encode())


def read(directory: Path) -> dict[str, Any]:
    """Parse and self-verify a checkpoint's manifest; :class:`ManifestError` says why not."""
    path = Path(directory) / MANIFEST
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path} is missing (the checkpoint was never completed)") from None
    try:
        manifest = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path} does not parse ({err}): truncated or damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path} is not a {FORMAT} manifest")
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    if manifest.get("sha256") != _body_digest(body):
        raise ManifestError(f"{path} fails its own checksum: damaged")
    if step_of(directory) != manifest.get("step"):
        raise ManifestError(f"{path} names step {manifest.get('step')}, its directory "
                            f"{Path(directory).name}")
    return manifest


def info(directory: Path) -> CheckpointInfo:
    manifest = read(directory)
    return CheckpointInfo(path=Path(directory), step=manifest["step"],
                          consumed_samples=manifest["consumed_samples"],
                          layout=manifest["layout"], manifest=manifest)


def verify_files(directory: Path, manifest: dict[str, Any],
                 names: Optional[Iterable[str]] = None) -> list[str]:
    """Check size and SHA-256 of the manifest's files (or of ``names`` among them);
    return one line per problem (empty: all good)."""
    problems = []
    files = manifest["files"]
    for name in (sorted(files) if names is None else names):
        want = files[name]
        path = Path(directory) / name
        try:
            size, digest = sha256_file(path)
        except FileNotFoundError:
            problems.append(f"{path}: missing")
            continue
        if size != want["bytes"]:
            problems.append(f"{path}: {size} bytes, manifest says {want['bytes']}")
        elif digest != want["sha256"]:
            problems.append(f"{path}: SHA-256 {digest[:16]}... differs from the manifest's "
                            f"{want['sha256'][:16]}...")
    return problems


def candidates(root: Path) -> list[Path]:
    """Checkpoint directories under ``root`` that have a manifest file, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) is not None and (p / MANIFEST).exists()]
    return sorted(found, key=lambda p: step_of(p) or 0, reverse=True)


def prune(root: Path, keep: int, protect: Optional[Path] = None) -> list[Path]:
    """Keep the ``keep`` newest checkpoints with a valid manifest; remove older ones and
    incomplete directories older than the newest complete one. Returns what was removed."""
    root = Path(root)
    complete = []
    for path in candidates(root):
        try:
            read(path)
            complete.append(path)
        except ManifestError:
            continue
    removed = []
    doomed = complete[keep:]
    if complete:
        newest = step_of(complete[0]) or 0
        for p in root.iterdir():
            step = step_of(p)
            if step is not None and step < newest and p not in complete and p.is_dir():
                doomed.append(p)
    for path in doomed:
        if protect is not None and Path(path) == Path(protect):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def write_tracker(root: Path, step: int) -> None:
    """megatron's ``latest_checkpointed_iteration.txt`` (read by Megatron-LM/Bridge tools)."""
    write_atomic(Path(root) / TRACKER, f"{step}\n".encode())


def versions() -> dict[str, str]:
    """Versions of the package and the libraries that wrote a checkpoint."""
    from importlib import metadata

    import torch

    from ..compat.megatron_checkpoint import megatron_version

    try:
        ncl_version = metadata.version("nemo-checkpointless")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        ncl_version = "unknown"
    return {"nemo_checkpointless": ncl_version, "megatron_core": megatron_version(),
            "torch": torch.__version__}
