"""Coalesced, striped, checksummed peer-to-peer transfer of a rank's state.

A replacement's optimizer shard is sent as one flat byte range, not tensor by tensor:
each donor holding an identical copy sends one contiguous stripe (striping spreads the
load over donors) in messages of at most ``CHUNK_BYTES``, each followed by its checksum,
which the receiver verifies as soon as the message lands, while the next ones are still
arriving. A small control blob (RNG, counters, scheduler, the last metrics record) follows
from the first donor. The optimizer state is laid out flat (``megatron/shards.py``), so
bytes go from the donor's optimizer memory to the receiver's without packing
(:class:`ByteLayout`).

The checksum (:func:`checksum`) is a pair of 64-bit sums over the message's 8-byte words:
their plain sum, and a sum of 4 KB row sums weighted by odd row numbers (modulo 2**64).
One pass of row sums computes both, at memory bandwidth, with torch ops on the device that
holds the state: a GPU job checks its state where it lives; on this machine's CPUs it
costs a third of a sum plus a position-weighted dot over every word (the previous
scheme) and under a tenth of zlib's CRC-32. Modular sums do not depend on the order of
the additions, so donor and receiver agree bit for bit whatever reduction order their
kernels use. It detects every error confined to one word (every single-bit error), a
zeroed, truncated or misplaced message, and data exchanged between two different 4 KB
rows; it does not see words reordered inside one 4 KB row, nor two errors that cancel
exactly in both sums, patterns that transports do not produce (TCP, NVLink and
InfiniBand deliver a message's bytes in order).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..megatron.shards import from_bytes, to_bytes

TAG_DATA, TAG_CHECK, TAG_BLOB_SIZE, TAG_BLOB = 11, 12, 13, 14


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


def stripes(total: int, parts: int) -> list[tuple[int, int]]:
    """Split ``total`` bytes into ``parts`` contiguous ranges of near-equal size, cut on
    8-byte multiples (so messages start word-aligned where their memory is)."""
    bounds = [min(total, (total * i // parts) // 8 * 8) for i in range(parts)] + [total]
    return list(zip(bounds, bounds[1:]))


CHUNK_BYTES = 4 << 20  # message size: large enough to be bandwidth-bound, small enough
                       # that the receiver checks one chunk while the next arrives

ROW_WORDS = 512  # 4 KB rows: the checksum's position weighting is per row

_WEIGHTS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _weights(device: torch.device, n: int) -> torch.Tensor:
    """1, 3, 5, ... (n odd numbers) as int64 on ``device``; cached. Odd weights are
    invertible modulo 2**64, so an error in one row always changes the weighted sum."""
    key = (device, max(n, CHUNK_BYTES // 8 // ROW_WORDS + 1))
    w = _WEIGHTS.get(key)
    if w is None:
        w = _WEIGHTS[key] = torch.arange(1, 2 * key[1], 2, dtype=torch.int64, device=device)
    return w[:n]


def checksum(buf: torch.Tensor) -> torch.Tensor:
    """(sum of words, odd-weighted sum of 4 KB row sums) of a uint8 tensor, as 2 int64.

    Words are the message's bytes in groups of 8 from its first byte, the last one
    zero-padded; a message that does not start on an 8-byte address is copied first, so
    the result depends on the bytes alone, never on where they lie in memory. The last
    row may be shorter than 4 KB.
    """
    n = buf.numel()
    body = n - n % 8
    if buf.data_ptr() % 8 or n % 8:
        padded = torch.zeros(body + (8 if n % 8 else 0), dtype=torch.uint8, device=buf.device)
        padded[:n].copy_(buf)
        buf, body = padded, padded.numel()
    words = buf[:body].view(torch.int64)
    if words.numel() == 0:
        return torch.zeros(2, dtype=torch.int64, device=buf.device)
    full = words.numel() - words.numel() % ROW_WORDS
    rows = words[:full].view(-1, ROW_WORDS).sum(1)
    if full < words.numel():
        rows = torch.cat((rows, words[full:].sum().reshape(1)))
    return torch.stack((rows.sum(), torch.dot(rows, _weights(buf.device, rows.numel()))))


class ByteLayout:
    """A rank's state tensors seen as one virtual byte range.

    Tensors adjacent in memory form runs; a byte range inside one run is a zero-copy view.
    Message boundaries are a function of tensor sizes only, so donor and receiver agree
    on them whatever their allocators did; a range that spans runs is copied.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.runs: list[tuple[int, int, torch.Tensor]] = []
        pos = 0
        cur: list[Any] = []  # [storage, begin_ptr, end_ptr, virtual_start]
        for t in tensors:
            if not t.is_contiguous():
                raise ValueError("state tensors must be contiguous")
            n = t.numel() * t.element_size()
            storage = t.untyped_storage()
            ptr = t.data_ptr()
            if cur and storage.data_ptr() == cur[0].data_ptr() and ptr == cur[2]:
                cur[2] += n
            else:
                self._flush(cur)
                cur = [storage, ptr, ptr + n, pos]
            pos += n
        self._flush(cur)
        self.total = pos

    def _flush(self, cur: list[Any]) -> None:
        if not cur:
            return
        storage, begin, end, vstart = cur
        view = torch.empty(0, dtype=torch.uint8).set_(
            storage, begin - storage.data_ptr(), (end - begin,))
        self.runs.append((vstart, vstart + (end - begin), view))

    def _pieces(self, a: int, b: int) -> list[tuple[int, int, torch.Tensor]]:
        out = []
        for start, end, view in self.runs:
            lo, hi = max(a, start), min(b, end)
            if lo < hi:
                out.append((lo, hi, view[lo - start:hi - start]))
        return out

    def view(self, a: int, b: int) -> Optional[torch.Tensor]:
        pieces = self._pieces(a, b)
        return pieces[0][2] if len(pieces) == 1 else None

    def gather(self, a: int, b: int) -> torch.Tensor:
        return torch.cat([p for _, _, p in self._pieces(a, b)])

    def scatter(self, a: int, buf: torch.Tensor) -> None:
        for lo, hi, piece in self._pieces(a, a + buf.numel()):
            piece.copy_(buf[lo - a:hi - a])


def messages(total: int, donors: Sequence[int],
             cuts: Sequence[int] = ()) -> list[tuple[int, int, int]]:
    """(donor, start, end) byte ranges: one stripe per donor, cut at ``cuts`` (group
    boundaries, so a message stays inside one block of memory) and into CHUNK_BYTES pieces."""
    out = []
    for donor, (lo, hi) in zip(donors, stripes(total, len(donors))):
        bounds = sorted({lo, hi, *(c for c in cuts if lo < c < hi)})
        for a, b in zip(bounds, bounds[1:]):
            for x in range(a, b, CHUNK_BYTES):
                out.append((donor, x, min(b, x + CHUNK_BYTES)))
    return out


def group_cuts(groups: Sequence[Sequence[torch.Tensor]]) -> list[int]:
    """Byte offsets where one group of tensors ends and the next begins."""
    cuts, pos = [], 0
    for group in groups[:-1]:
        pos += nbytes(group)
        cuts.append(pos)
    return cuts


def exchange(plan: dict[int, list[int]], rank: int,
             groups: Sequence[Sequence[torch.Tensor]], blob: Callable[[], Any],
             group: Any = None) -> tuple[Any, TransferStats]:
    """Run the transfers of ``plan`` (replacement rank -> its donors) that involve ``rank``.

    Donors send their stripe straight from the optimizer's memory, each message followed by
    its checksum; replacements receive straight into theirs and verify each message as it
    lands.
    Returns (received blob or None, stats).
    """
    stats = TransferStats()
    start = time.perf_counter()
    layout = ByteLayout([t for g in groups for t in g])
    cuts = group_cuts(groups)
    works: list[Any] = []
    keep: list[torch.Tensor] = []
    received: Any = None
    for target, donors in sorted(plan.items()):
        mine = [m for m in messages(layout.total, donors, cuts) if m[0] == rank]
        if mine:
            for _, a, b in mine:
                piece = layout.view(a, b)
                piece = piece if piece is not None else layout.gather(a, b)
                works.append(dist.isend(piece, target, group=group, tag=TAG_DATA))
                # the message's sum is computed while the message is on the wire
                check = checksum(piece)
                keep.extend((piece, check))
                works.append(dist.isend(check, target, group=group, tag=TAG_CHECK))
                stats.bytes_sent += piece.numel()
            if rank == donors[0]:
                payload = to_bytes(blob())
                size = torch.tensor([payload.numel()], dtype=torch.int64)
                keep.extend((payload, size))
                works.append(dist.isend(size, target, group=group, tag=TAG_BLOB_SIZE))
                works.append(dist.isend(payload, target, group=group, tag=TAG_BLOB))
        if rank == target:
            received = _receive(layout, messages(layout.total, donors, cuts), donors, group,
                                stats)
    for work in works:
        work.wait()
    stats.seconds = time.perf_counter() - start
    return received, stats


def _receive(layout: ByteLayout, plan: list[tuple[int, int, int]], donors: Sequence[int],
             group: Any, stats: TransferStats) -> Any:
    pending = []
    for donor, a, b in plan:
        view = layout.view(a, b)
        buf = view if view is not None else torch.empty(b - a, dtype=torch.uint8)
        check = torch.zeros(2, dtype=torch.int64)
        pending.append((donor, a, buf, view is None,
                        dist.irecv(buf, donor, group=group, tag=TAG_DATA),
                        check, dist.irecv(check, donor, group=group, tag=TAG_CHECK)))
    size = torch.zeros(1, dtype=torch.int64)
    size_work = dist.irecv(size, donors[0], group=group, tag=TAG_BLOB_SIZE)
    for donor, a, buf, copied, work, check, check_work in pending:
        work.wait()
        check_work.wait()
        if not torch.equal(checksum(buf), check):
            raise TransferError(f"state bytes [{a}, {a + buf.numel()}) from rank {donor} "
                                "failed their checksum")
        if copied:
            layout.scatter(a, buf)
        stats.bytes_received += buf.numel()
    size_work.wait()
    payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(payload, donors[0], group=group, tag=TAG_BLOB)
    stats.received_from = list(donors)
    return from_bytes(payload)
