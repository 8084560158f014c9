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
InfiniBand deliver a message's bytes in order). The weighted sum is an elementwise product
and a sum, not ``torch.dot`` (not implemented for integer CUDA tensors); products and sums
modulo 2**64 do not depend on the order of the additions, so the value is the same.

Every buffer, size and checksum lives on the device that holds the state (the rank's
device, ``device.py``); the pickled control blob is moved there to be sent and back to the
host to be read. Two ways to move the bytes, with the same messages in the same order:

* gloo (CPU rehearsal): one ``isend``/``irecv`` per message, tagged; the receiver checks
  each message as it lands while the next ones are still arriving.
* NCCL: ``batch_isend_irecv`` over the world group. NCCL matches the point-to-point
  operations between two ranks by their order alone (tags are ignored), and a batch runs
  on the group's own communicator: no two-rank communicator is created on the side
  (one such, created lazily by a plain ``send``, can hang an abort: pytorch/pytorch#150690).
  Per pair, both sides list the messages in the same order (``messages`` is a function
  of sizes only), then the blob's size; the blob follows in a second batch, once its
  size is known. Messages are larger (``NCCL_CHUNK_BYTES``) and checked once the batch
  has landed: on a GPU the check runs at memory bandwidth, far above the link's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from .. import device as rank_device
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
NCCL_CHUNK_BYTES = 256 << 20  # NCCL pipelines a message itself; fewer ops per batch

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
    if n == 0:
        return torch.zeros(2, dtype=torch.int64, device=buf.device)
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
    weighted = (rows * _weights(buf.device, rows.numel())).sum()
    return torch.stack((rows.sum(), weighted))


class ByteLayout:
    """A rank's state tensors seen as one virtual byte range.

    Tensors adjacent in memory form runs; a byte range inside one run is a zero-copy view.
    Message boundaries are a function of tensor sizes only, so donor and receiver agree
    on them whatever their allocators did; a range that spans runs is copied.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.runs: list[tuple[int, int, torch.Tensor]] = []
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise ValueError(f"state tensors on several devices {sorted(map(str, devices))}: "
                             "a rank's shard lives on its one device (device.py)")
        self.device = devices.pop() if devices else rank_device.current()
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
        # the empty tensor must live where the storage does: set_() refuses a CPU tensor
        # on CUDA storage
        view = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(
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


def messages(total: int, donors: Sequence[int], cuts: Sequence[int] = (),
             chunk: int = CHUNK_BYTES) -> list[tuple[int, int, int]]:
    """(donor, start, end) byte ranges: one stripe per donor, cut at ``cuts`` (group
    boundaries, so a message stays inside one block of memory) and into ``chunk``-byte
    pieces. A function of sizes only: donor and receiver list the same messages."""
    out = []
    for donor, (lo, hi) in zip(donors, stripes(total, len(donors))):
        bounds = sorted({lo, hi, *(c for c in cuts if lo < c < hi)})
        for a, b in zip(bounds, bounds[1:]):
            for x in range(a, b, chunk):
                out.append((donor, x, min(b, x + chunk)))
    return out


def group_cuts(groups: Sequence[Sequence[torch.Tensor]]) -> list[int]:
    """Byte offsets where one group of tensors ends and the next begins."""
    cuts, pos = [], 0
    for group in groups[:-1]:
        pos += nbytes(group)
        cuts.append(pos)
    return cuts


def batched_p2p(group: Any = None) -> bool:
    """Whether ``group`` (None: the world) moves state with ``batch_isend_irecv`` (NCCL)."""
    return str(dist.get_backend(group)).lower() == "nccl"


def exchange(plan: dict[int, list[int]], rank: int,
             groups: Sequence[Sequence[torch.Tensor]], blob: Callable[[], Any],
             group: Any = None, batched: Optional[bool] = None) -> tuple[Any, TransferStats]:
    """Run the transfers of ``plan`` (replacement rank -> its donors) that involve ``rank``.

    Donors send their stripe straight from the optimizer's memory, each message followed by
    its checksum; replacements receive straight into theirs and verify each message.
    ``batched``: NCCL's way (see the module docstring); default: :func:`batched_p2p`.
    Returns (received blob or None, stats).
    """
    stats = TransferStats()
    start = time.perf_counter()
    groups, host_groups = split_by_device(groups)
    if host_groups:  # tiny (torch Adam's host-side steps): they ride in the blob
        inner_blob = blob

        def blob() -> Any:
            return {"blob": inner_blob(), "host_groups": host_groups}

    layout = ByteLayout([t for g in groups for t in g])
    cuts = group_cuts(groups)
    if batched is None:
        batched = batched_p2p(group)
    if batched:
        received = _exchange_batched(plan, rank, layout, cuts, blob, group, stats)
    else:
        received = _exchange_tagged(plan, rank, layout, cuts, blob, group, stats)
    if host_groups and received is not None:
        for mine, theirs in zip(host_groups, received["host_groups"], strict=True):
            for t, value in zip(mine, theirs, strict=True):
                t.copy_(value)
        received = received["blob"]
    stats.seconds = time.perf_counter() - start
    return received, stats


def split_by_device(groups: Sequence[Sequence[torch.Tensor]]
                    ) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """(groups on the shard's device, groups on the host), the shard's device being the
    first tensor's. All on one device (CPU rehearsal, a GPU shard with TE's optimizer):
    every group is in the first list, unchanged."""
    first = next((t.device for g in groups for t in g), None)
    on_device: list[list[torch.Tensor]] = []
    on_host: list[list[torch.Tensor]] = []
    for g in groups:
        devices = {t.device for t in g}
        if not devices or devices == {first}:
            on_device.append(list(g))
        elif devices == {torch.device("cpu")}:
            on_host.append(list(g))
        else:
            raise ValueError(f"a state group spans {sorted(map(str, devices))}: each group "
                             "lives on the rank's device or, whole, on the host")
    return on_device, on_host


def _piece(layout: ByteLayout, a: int, b: int) -> torch.Tensor:
    piece = layout.view(a, b)
    return piece if piece is not None else layout.gather(a, b)


def _exchange_tagged(plan: dict[int, list[int]], rank: int, layout: ByteLayout,
                     cuts: list[int], blob: Callable[[], Any], group: Any,
                     stats: TransferStats) -> Any:
    """gloo: tagged messages, each checked as it lands while the next ones arrive."""
    works: list[Any] = []
    keep: list[torch.Tensor] = []
    received: Any = None
    for target, donors in sorted(plan.items()):
        mine = [m for m in messages(layout.total, donors, cuts, CHUNK_BYTES) if m[0] == rank]
        if mine:
            for _, a, b in mine:
                piece = _piece(layout, a, b)
                works.append(dist.isend(piece, target, group=group, tag=TAG_DATA))
                # the message's sum is computed while the message is on the wire
                check = checksum(piece)
                keep.extend((piece, check))
                works.append(dist.isend(check, target, group=group, tag=TAG_CHECK))
                stats.bytes_sent += piece.numel()
            if rank == donors[0]:
                payload = to_bytes(blob()).to(layout.device)
                size = torch.tensor([payload.numel()], dtype=torch.int64, device=layout.device)
                keep.extend((payload, size))
                works.append(dist.isend(size, target, group=group, tag=TAG_BLOB_SIZE))
                works.append(dist.isend(payload, target, group=group, tag=TAG_BLOB))
        if rank == target:
            plan_in = messages(layout.total, donors, cuts, CHUNK_BYTES)
            received = _receive(layout, plan_in, donors, group, stats)
    for work in works:
        work.wait()
    return received


def _receive(layout: ByteLayout, plan: list[tuple[int, int, int]], donors: Sequence[int],
             group: Any, stats: TransferStats) -> Any:
    dev = layout.device
    pending = []
    for donor, a, b in plan:
        view = layout.view(a, b)
        buf = view if view is not None else torch.empty(b - a, dtype=torch.uint8, device=dev)
        check = torch.zeros(2, dtype=torch.int64, device=dev)
        pending.append((donor, a, buf, view is None,
                        dist.irecv(buf, donor, group=group, tag=TAG_DATA),
                        check, dist.irecv(check, donor, group=group, tag=TAG_CHECK)))
    size = torch.zeros(1, dtype=torch.int64, device=dev)
    size_work = dist.irecv(size, donors[0], group=group, tag=TAG_BLOB_SIZE)
    for donor, a, buf, copied, work, check, check_work in pending:
        work.wait()
        check_work.wait()
        _verify(layout, donor, a, buf, copied, check, stats)
    size_work.wait()
    payload = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
    dist.recv(payload, donors[0], group=group, tag=TAG_BLOB)
    stats.received_from = list(donors)
    return from_bytes(payload.cpu())


def _verify(layout: ByteLayout, donor: int, a: int, buf: torch.Tensor, copied: bool,
            check: torch.Tensor, stats: TransferStats) -> None:
    if not torch.equal(checksum(buf), check):
        raise TransferError(f"state bytes [{a}, {a + buf.numel()}) from rank {donor} "
                            "failed their checksum")
    if copied:
        layout.scatter(a, buf)
    stats.bytes_received += buf.numel()


def _exchange_batched(plan: dict[int, list[int]], rank: int, layout: ByteLayout,
                      cuts: list[int], blob: Callable[[], Any], group: Any,
                      stats: TransferStats) -> Any:
    """NCCL: two batches per rank, every pair's operations listed in the same order on
    both sides (the proof is in the module docstring and docs/gpu.md)."""
    dev = layout.device
    ops: list[Any] = []
    keep: list[torch.Tensor] = []
    incoming: list[tuple[int, int, torch.Tensor, bool, torch.Tensor]] = []
    blob_to: list[tuple[int, torch.Tensor]] = []
    size_from: Optional[tuple[int, torch.Tensor]] = None
    for target, donors in sorted(plan.items()):
        msgs = messages(layout.total, donors, cuts, NCCL_CHUNK_BYTES)
        for _, a, b in (m for m in msgs if m[0] == rank):
            piece = _piece(layout, a, b)
            check = checksum(piece)
            keep.extend((piece, check))
            ops += [dist.P2POp(dist.isend, piece, target, group),
                    dist.P2POp(dist.isend, check, target, group)]
            stats.bytes_sent += piece.numel()
        if rank == donors[0]:
            payload = to_bytes(blob()).to(dev)
            size = torch.tensor([payload.numel()], dtype=torch.int64, device=dev)
            keep.append(size)
            ops.append(dist.P2POp(dist.isend, size, target, group))
            blob_to.append((target, payload))
        if rank == target:
            for donor, a, b in msgs:
                view = layout.view(a, b)
                buf = view if view is not None else torch.empty(b - a, dtype=torch.uint8,
                                                                device=dev)
                check = torch.zeros(2, dtype=torch.int64, device=dev)
                ops += [dist.P2POp(dist.irecv, buf, donor, group),
                        dist.P2POp(dist.irecv, check, donor, group)]
                incoming.append((donor, a, buf, view is None, check))
            size_from = (donors[0], torch.zeros(1, dtype=torch.int64, device=dev))
            ops.append(dist.P2POp(dist.irecv, size_from[1], donors[0], group))
            stats.received_from = list(donors)
    _run_batch(ops)
    for donor, a, buf, copied, check in incoming:
        _verify(layout, donor, a, buf, copied, check, stats)
    ops = [dist.P2POp(dist.isend, payload, target, group) for target, payload in blob_to]
    payload_in: Optional[torch.Tensor] = None
    if size_from is not None:
        payload_in = torch.empty(int(size_from[1].item()), dtype=torch.uint8, device=dev)
        ops.append(dist.P2POp(dist.irecv, payload_in, size_from[0], group))
    _run_batch(ops)
    return None if payload_in is None else from_bytes(payload_in.cpu())


def _run_batch(ops: list[Any]) -> None:
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
