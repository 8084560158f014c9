"""This rank's training state as ordered tensors, and the job-wide state hash.

The hash is the project's proof of exactness: SHA-256 over every rank's model parameters
and optimizer state (fp32 main params, Adam moments, step) in a fixed order.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator

import torch

from .optimizer import leaf_optimizers


def model_tensors(model_chunks: list[torch.nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every model parameter of this rank, in a fixed order."""
    for i, chunk in enumerate(model_chunks):
        for name, param in chunk.named_parameters():
            yield f"model.{i}.{name}", param.detach()


def optimizer_tensors(optimizer: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for this rank's optimizer shard: main params, Adam moments, step."""
    for o, opt in enumerate(leaf_optimizers(optimizer)):
        inner = opt.optimizer
        for g, group in enumerate(inner.param_groups):
            for p, main_param in enumerate(group["params"]):
                prefix = f"optim.{o}.{g}.{p}"
                yield f"{prefix}.main", main_param.detach()
                state = inner.state.get(main_param, {})
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    value = state.get(key)
                    if value is not None:
                        t = value if torch.is_tensor(value) else torch.tensor(float(value))
                        yield f"{prefix}.{key}", t.detach()


def local_digest(model_chunks: list[torch.nn.Module], optimizer: Any) -> str:
    """SHA-256 of this rank's model and optimizer tensors, names and bytes."""
    h = hashlib.sha256()
    for name, tensor in (*model_tensors(model_chunks), *optimizer_tensors(optimizer)):
        h.update(name.encode())
        t = tensor.contiguous().cpu()
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def job_digest(model_chunks: list[torch.nn.Module], optimizer: Any, group: Any = None) -> str:
    """SHA-256 over every rank's local digest in rank order (collective over ``group``)."""
    mine = local_digest(model_chunks, optimizer)
    world = torch.distributed.get_world_size(group)
    digests: list[Any] = [None] * world
    torch.distributed.all_gather_object(digests, mine, group=group)
    return hashlib.sha256("".join(digests).encode()).hexdigest()
