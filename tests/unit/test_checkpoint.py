"""The asynchronous disk checkpoint of a rank's state: one flat, reused snapshot buffer."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from nemo_checkpointless.lab.checkpoint import AsyncCheckpointer, complete_steps, load_part


def _state() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1000, generator=g), torch.randn(3, 7, generator=g).double(),
            torch.tensor(5, dtype=torch.int64), torch.randn(17, generator=g).half()]


@pytest.mark.parametrize("fmt", ["raw", "dcp"])
def test_roundtrip_every_dtype_and_buffer_reuse(tmp_path, fmt):
    state = _state()
    ckpt = AsyncCheckpointer(tmp_path, rank=0, world_size=1, interval=1,
                             tensors=lambda: state, blob=lambda step: {"step": step}, keep=2,
                             fmt=fmt)
    ckpt.save(1, wait=True)
    buffer = ckpt._buffer
    want = [t.clone() for t in state]
    for t in state:
        t.add_(1)  # the next checkpoint differs; the first one must not change
    ckpt.save(2, wait=True)
    assert ckpt._buffer is buffer, "the snapshot buffer is allocated once"
    assert complete_steps(tmp_path, 1) == [1, 2]
    target = [torch.zeros_like(t) for t in state]
    assert load_part(tmp_path, 1, 0, target) == {"step": 1}
    for got, expected in zip(target, want):
        assert torch.equal(got, expected)
    assert load_part(tmp_path, 2, 0, target) == {"step": 2}
    for got, expected in zip(target, state):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("fmt", ["raw", "dcp"])
def test_load_into_another_layout_is_refused(tmp_path, fmt):
    state = _state()
    ckpt = AsyncCheckpointer(tmp_path, rank=0, world_size=1, interval=1,
                             tensors=lambda: state, blob=lambda step: {}, keep=1, fmt=fmt)
    ckpt.save(1, wait=True)
    with pytest.raises(ValueError, match="another model or parallel layout"):
        load_part(tmp_path, 1, 0, [torch.zeros(10)])


@pytest.mark.parametrize("root", ["tmp", "/dev/shm"])
def test_raw_part_is_one_file_of_exact_length(tmp_path, root):
    """O_DIRECT pads the last block; the file is cut back to header + state + blob (on
    tmpfs the write is buffered and never padded)."""
    base = tmp_path if root == "tmp" else Path(root) / f"ncl-raw-{os.getpid()}"
    state = _state()
    ckpt = AsyncCheckpointer(base, rank=3, world_size=4, interval=1,
                             tensors=lambda: state, blob=lambda step: {"step": step}, keep=1)
    try:
        ckpt.save(7, wait=True)
        files = sorted(p.name for p in (base / "step_00000007").iterdir())
        assert files == ["rank_00003.done", "rank_00003.ncl"]
        size = (base / "step_00000007" / "rank_00003.ncl").stat().st_size
        assert size == 4096 + sum(t.numel() * t.element_size() for t in state) + len(
            pickle.dumps({"step": 7}))
        target = [torch.zeros_like(t) for t in state]
        assert load_part(base, 7, 3, target) == {"step": 7}
        assert all(torch.equal(a, b) for a, b in zip(target, state))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_damaged_raw_part_says_what_to_do(tmp_path):
    state = _state()
    ckpt = AsyncCheckpointer(tmp_path, rank=0, world_size=1, interval=1,
                             tensors=lambda: state, blob=lambda step: {}, keep=1)
    ckpt.save(1, wait=True)
    part = tmp_path / "step_00000001" / "rank_00000.ncl"
    data = part.read_bytes()
    part.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="damaged; delete its step directory"):
        load_part(tmp_path, 1, 0, [torch.zeros_like(t) for t in state])
    part.write_bytes(b"x" * len(data))
    with pytest.raises(ValueError, match="not a nemo-checkpointless checkpoint part"):
        load_part(tmp_path, 1, 0, [torch.zeros_like(t) for t in state])


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="use one of raw, dcp"):
        AsyncCheckpointer(tmp_path, 0, 1, 1, tensors=list, blob=dict, fmt="zip")


@pytest.mark.parametrize("root", ["tmp", "/dev/shm"])
def test_direct_writer_keeps_every_byte(tmp_path, root):
    from nemo_checkpointless.lab.checkpoint import DirectWriter

    base = tmp_path if root == "tmp" else Path(root)
    path = base / f"ncl-direct-{os.getpid()}"
    data = os.urandom(2 * DirectWriter.BLOCK + 12345)
    try:
        with DirectWriter(str(path)) as out:
            out.write(data[:10])                       # unaligned pieces, across blocks
            out.write(memoryview(data)[10:DirectWriter.BLOCK + 7])
            out.write(data[DirectWriter.BLOCK + 7:])
            assert out.tell() == len(data)
        assert path.read_bytes() == data
    finally:
        path.unlink(missing_ok=True)
