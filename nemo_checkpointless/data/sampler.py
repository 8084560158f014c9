"""Deterministic batch positions: which sample indices a step reads, from consumed_samples.

The data position of a run is a single integer, ``consumed_samples`` (samples of all DP
ranks consumed so far). Global batch ``k`` of ``gbs`` samples is the index range
``[consumed, consumed + gbs)``; DP rank ``r`` of ``dp`` takes the contiguous chunk
``[consumed + r * gbs/dp, consumed + (r+1) * gbs/dp)`` and splits it into micro-batches.
Everything is a pure function of its arguments, so a restarted or replacement rank resumes
at exactly the right samples from ``consumed_samples`` alone.
"""

from __future__ import annotations

import hashlib

import torch


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_consumed(consumed_samples: int) -> None:
    if not isinstance(consumed_samples, int) or consumed_samples < 0:
        raise ValueError(
            f"consumed_samples must be a non-negative integer, got {consumed_samples!r}"
        )


def global_batch_indices(consumed_samples: int, global_batch_size: int) -> range:
    """Sample indices of the global batch that starts after ``consumed_samples`` samples."""
    _check_consumed(consumed_samples)
    _check_positive(global_batch_size=global_batch_size)
    return range(consumed_samples, consumed_samples + global_batch_size)


def micro_batch_indices(
    consumed_samples: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
) -> list[list[int]]:
    """Sample indices of each micro-batch of one DP rank for the next global batch.

    Returns ``gbs / (dp_size * mbs)`` lists of ``mbs`` indices. Over all DP ranks the
    micro-batches partition :func:`global_batch_indices` exactly.

    Raises:
        ValueError: on non-positive sizes, a ``dp_rank`` outside ``[0, dp_size)``, or sizes
            that do not divide (``gbs`` by ``dp_size``, then ``gbs / dp_size`` by ``mbs``).
    """
    _check_consumed(consumed_samples)
    _check_positive(
        global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, dp_size=dp_size
    )
    if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
        raise ValueError(
            f"dp_rank must be in [0, {dp_size}) for dp_size={dp_size}, got {dp_rank!r}"
        )
    if global_batch_size % dp_size:
        raise ValueError(
            f"global_batch_size ({global_batch_size}) is not divisible by the data-parallel "
            f"size ({dp_size}); use a global batch size that is a multiple of {dp_size}"
        )
    per_rank = global_batch_size // dp_size
    if per_rank % micro_batch_size:
        raise ValueError(
            f"the per-rank batch global_batch_size / dp_size = {global_batch_size} / {dp_size} "
            f"= {per_rank} is not divisible by micro_batch_size ({micro_batch_size}); use a "
            f"global batch size that is a multiple of dp_size * micro_batch_size = "
            f"{dp_size * micro_batch_size}, or a micro batch size that divides {per_rank}"
        )
    start = consumed_samples + dp_rank * per_rank
    return [
        list(range(begin, begin + micro_batch_size))
        for begin in range(start, start + per_rank, micro_batch_size)
    ]


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack per-sample dicts of equally shaped tensors into one batch (new leading dim).

    Keys whose value is None in every sample (e.g. Megatron's absent attention mask) are
    dropped.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    keys = list(samples[0])
    for i, sample in enumerate(samples[1:], start=1):
        if list(sample) != keys:
            raise ValueError(
                f"sample {i} has keys {sorted(sample)}, sample 0 has {sorted(keys)}; all "
                "samples of a batch must come from the same dataset"
            )
    batch: dict[str, torch.Tensor] = {}
    for key in keys:
        values = [sample[key] for sample in samples]
        if all(v is None for v in values):
            continue
        if any(v is None for v in values):
            raise ValueError(f"{key!r} is None in some samples but not in others")
        batch[key] = torch.stack([torch.as_tensor(v) for v in values])
    return batch


def batch_hash(tensor: torch.Tensor) -> str:
    """sha256 hex digest of a token tensor, for data-correctness records.

    The values are hashed as contiguous little-endian int64 on CPU, so the digest depends
    only on the token values and shape order, not on the device or integer dtype.
    """
    data = tensor.detach().to(device="cpu", dtype=torch.int64).contiguous()
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()
