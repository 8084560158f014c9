"""Which healthy peers hold each piece a replacement rank needs (pure logic, no groups).

Built from every rank's :class:`RankInfo`, gathered right after a recovery re-forms the
world. Also answers the pre-flight question: which ranks have no replica at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class RankInfo:
    """What one rank reports at the start of a recovery."""

    rank: int
    has_state: bool
    applied_step: int   # last step whose optimizer update this rank applied
    entered_step: int   # last step whose commit barrier this rank entered (grads final)
    passed_step: int    # last step whose commit barrier completed on this rank
    tp: int
    pp: int
    shard: int          # position inside the optimizer instance (0 for a plain optimizer)

    FIELDS = 8

    def to_tensor(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """The fields as int64 on ``device`` (the rank's, for the all-gather)."""
        return torch.tensor([self.rank, int(self.has_state), self.applied_step,
                             self.entered_step, self.passed_step, self.tp, self.pp,
                             self.shard], dtype=torch.int64, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "RankInfo":
        v = [int(x) for x in t.tolist()]
        return cls(v[0], bool(v[1]), v[2], v[3], v[4], v[5], v[6], v[7])

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.tp, self.pp, self.shard)


class UnrecoverableError(RuntimeError):
    """No healthy peer holds some piece of state and no fallback is configured."""


@dataclass(frozen=True)
class Agreement:
    """The step every rank continues from, and who must roll forward."""

    committed_step: int
    roll_forward: tuple[int, ...]
    fresh_start: bool


def agree(infos: Sequence[RankInfo]) -> Agreement:
    """Commit protocol decision (docs/architecture.md, "The commit protocol"): roll forward
    if any rank passed."""
    healthy = [i for i in infos if i.has_state]
    if not healthy:
        return Agreement(0, (), fresh_start=True)
    committed = max(max(i.applied_step, i.passed_step) for i in healthy)
    roll: list[int] = []
    for i in healthy:
        if i.applied_step == committed:
            continue
        if i.applied_step == committed - 1 and i.entered_step == committed:
            roll.append(i.rank)
            continue
        raise UnrecoverableError(
            f"rank {i.rank} applied step {i.applied_step} and entered {i.entered_step}, but "
            f"step {committed} was committed elsewhere: its state cannot be made consistent")
    return Agreement(committed, tuple(roll), fresh_start=False)


def donors_for(infos: Sequence[RankInfo], rank: int) -> list[int]:
    """Healthy ranks holding the same optimizer shard (and model shard) as ``rank``."""
    me = next(i for i in infos if i.rank == rank)
    return sorted(i.rank for i in infos if i.has_state and i.key == me.key and i.rank != rank)


def replicas_by_shard(infos: Sequence[RankInfo]) -> dict[tuple[int, int, int], list[int]]:
    """Every shard key and the ranks that hold it."""
    out: dict[tuple[int, int, int], list[int]] = {}
    for i in infos:
        out.setdefault(i.key, []).append(i.rank)
    return out


def unprotected_ranks(infos: Sequence[RankInfo]) -> list[int]:
    """Ranks whose optimizer shard exists nowhere else (their loss needs a disk fallback)."""
    return sorted(r for ranks in replicas_by_shard(infos).values() if len(ranks) == 1
                  for r in ranks)
