"""Coalesced, striped, checksummed peer-to-peer transfer of a rank's state.

A replacement's optimizer shard is sent as one flat byte buffer, not tensor by tensor:
each donor holding an identical copy sends one contiguous stripe (striping spreads the
load over donors), with a CRC-32 of the stripe that the receiver verifies before the bytes
are unpacked into the optimizer. A small control blob (RNG, counters, scheduler, the last
metrics record) follows from the first donor.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from ..megatron.shards import from_bytes, to_bytes

TAG_DATA, TAG_CRC, TAG_BLOB_SIZE, TAG_BLOB = 11, 12, 13, 14


class TransferError(RuntimeError):
    """Received state failed its checksum."""


@dataclass
class TransferStats:
    """What this rank sent and received during one recovery."""

    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    received_from: list[int] = field(default_factory=list)


def nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError("state tensors must be contiguous to be packed without a copy")
    return t.reshape(-1).view(torch.uint8)


def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """All tensors' bytes, back to back, in one buffer (one copy)."""
    buf = torch.empty(nbytes(tensors), dtype=torch.uint8)
    offset = 0
    for t in tensors:
        view = _bytes_view(t)
        buf[offset:offset + view.numel()].copy_(view)
        offset += view.numel()
    return buf


def unpack(buf: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Inverse of :func:`pack`: write the bytes back into ``tensors`` in place."""
    expected = nbytes(tensors)
    if buf.numel() != expected:
        raise TransferError(f"received {buf.numel()} bytes for a state of {expected} bytes")
    offset = 0
    for t in tensors:
        view = _bytes_view(t)
        view.copy_(buf[offset:offset + view.numel()])
        offset += view.numel()


def stripes(total: int, parts: int) -> list[tuple[int, int]]:
    """Split ``total`` bytes into ``parts`` contiguous ranges of near-equal size."""
    base, extra = divmod(total, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


def crc32(buf: torch.Tensor) -> int:
    return zlib.crc32(memoryview(buf.numpy())) & 0xFFFFFFFF


def exchange(plan: dict[int, list[int]], rank: int, tensors: Sequence[torch.Tensor],
             blob: Callable[[], Any], group: Any = None) -> tuple[Any, TransferStats]:
    """Run the transfers of ``plan`` (replacement rank -> its donors) that involve ``rank``.

    Donors send; replacements receive into ``tensors`` and get the donor's ``blob()``.
    Returns (received blob or None, stats).
    """
    stats = TransferStats()
    start = time.perf_counter()
    works: list[Any] = []
    packed: torch.Tensor | None = None
    received: Any = None
    keep: list[torch.Tensor] = []
    for target, donors in sorted(plan.items()):
        if rank in donors:
            if packed is None:
                packed = pack(tensors)
            lo, hi = stripes(packed.numel(), len(donors))[donors.index(rank)]
            piece = packed[lo:hi]
            crc = torch.tensor([crc32(piece)], dtype=torch.int64)
            keep.append(crc)
            works.append(dist.isend(piece, target, group=group, tag=TAG_DATA))
            works.append(dist.isend(crc, target, group=group, tag=TAG_CRC))
            stats.bytes_sent += piece.numel()
            if rank == donors[0]:
                payload = to_bytes(blob())
                size = torch.tensor([payload.numel()], dtype=torch.int64)
                keep.extend((payload, size))
                works.append(dist.isend(size, target, group=group, tag=TAG_BLOB_SIZE))
                works.append(dist.isend(payload, target, group=group, tag=TAG_BLOB))
        if rank == target:
            buf = torch.empty(nbytes(tensors), dtype=torch.uint8)
            ranges = stripes(buf.numel(), len(donors))
            crcs = [torch.zeros(1, dtype=torch.int64) for _ in donors]
            recvs = []
            for donor, (lo, hi), crc in zip(donors, ranges, crcs):
                recvs.append(dist.irecv(buf[lo:hi], donor, group=group, tag=TAG_DATA))
                recvs.append(dist.irecv(crc, donor, group=group, tag=TAG_CRC))
            size = torch.zeros(1, dtype=torch.int64)
            dist.recv(size, donors[0], group=group, tag=TAG_BLOB_SIZE)
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
            dist.recv(payload, donors[0], group=group, tag=TAG_BLOB)
            for work in recvs:
                work.wait()
            for donor, (lo, hi), crc in zip(donors, ranges, crcs):
                if crc32(buf[lo:hi]) != int(crc.item()):
                    raise TransferError(f"state stripe from rank {donor} failed its checksum")
            unpack(buf, tensors)
            received = from_bytes(payload)
            stats.bytes_received += buf.numel()
            stats.received_from = list(donors)
    for work in works:
        work.wait()
    stats.seconds = time.perf_counter() - start
    return received, stats
