"""The state contract: what each component saves and loads, and the optimizer shard.

Every component whose state a replacement (or a rollback) needs is :class:`Stateful`.
:class:`RankState` composes them under fixed names; peer replication, the disk paths and
the checkpoint-restart baseline all move ``RankState.state_dict()`` beside the optimizer
shard, which is reached through one accessor, :class:`OptimizerShard`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, runtime_checkable

import torch


@runtime_checkable
class Stateful(Protocol):
    """Saves and restores its own state as a picklable dict."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class DataPosition:
    """Where the data stream stands: the samples consumed by committed steps.

    A rank's micro-batches are a pure function of this number and its data-parallel rank,
    so restoring it restores the data stream exactly, in O(1).
    """

    consumed_samples: int = 0

    def advance(self, samples: int) -> None:
        self.consumed_samples += samples

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed_samples = int(state["consumed_samples"])


class RngStreams:
    """Every random stream of this process, as it is now (it starts the next step when
    saved after a committed one): torch CPU and CUDA, megatron's tensor-parallel tracker,
    numpy and Python's ``random``."""

    def state_dict(self) -> dict[str, Any]:
        from .megatron.shards import capture_rng

        return {"rng": capture_rng()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from .megatron.shards import restore_rng

        restore_rng(state["rng"])


class RankState:
    """Named :class:`Stateful` parts of one rank, saved and loaded together."""

    def __init__(self, parts: Mapping[str, Stateful]) -> None:
        self.parts = dict(parts)

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.parts) - set(state))
        if missing:
            raise KeyError(f"saved rank state lacks {', '.join(missing)} (saved by another "
                           "version of the package?)")
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


class OptimizerShard:
    """This rank's optimizer shard (fp32 main params, Adam moments and steps) as tensors.

    The one accessor every path uses: peer transfer (``groups``: four blocks, each one
    contiguous allocation), disk checkpoints (``tensors``), and, after new values landed in
    place, ``publish`` copies the main params into the model's parameters. Its
    :class:`Stateful` part is the per-group state (step, lr, weight decay: a fused Adam
    that counts steps per group keeps them there), which travels in the rank state.
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def groups(self) -> list[list[torch.Tensor]]:
        from .megatron.shards import optimizer_state_groups

        return optimizer_state_groups(self.optimizer)

    def tensors(self) -> list[torch.Tensor]:
        return [t for group in self.groups() for t in group]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def state_dict(self) -> dict[str, Any]:
        from .megatron.shards import optimizer_group_state

        return {"param_groups": optimizer_group_state(self.optimizer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from .megatron.shards import load_optimizer_group_state

        load_optimizer_group_state(self.optimizer, state["param_groups"])

    def publish(self) -> None:
        """Write the (just loaded) main params into the model params."""
        from .megatron.shards import copy_main_to_model

        copy_main_to_model(self.optimizer)
