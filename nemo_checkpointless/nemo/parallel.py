"""megatron's parallel state as NeMo built it, rebuilt the same way after a recovery.

:meth:`ParallelLayout.build` runs NeMo's own set-up (``init_model_parallel``, from the
strategy's ``AppState``) and records every keyword argument megatron's
``initialize_model_parallel`` received (sizes, rank order, expert parallelism, optimizer
instances, communicator config...) and the ranks of every group it built.
:meth:`ParallelLayout.rebuild` re-runs megatron's set-up with exactly those arguments on
the new world and checks that every group has the same ranks as at the start, so a
recovered job cannot silently run a different layout.
"""

from __future__ import annotations

import math
from typing import Any

import torch.distributed as dist

from ..comm.world import backend_for, default_timeout
from ..compat import nemo_parallel
from ..megatron import parallel
from ..megatron.rebind import groups_by_role


def group_ranks() -> dict[str, list[int]]:
    """role -> global ranks of this rank's group in that role (megatron's groups)."""
    return {role: list(dist.get_process_group_ranks(group))
            for role, group in groups_by_role().items() if role != "WORLD"}


class ParallelLayout:
    """The recorded arguments and groups of megatron's parallel state."""

    def __init__(self, backend: str = "auto") -> None:
        self.backend = backend_for(backend)
        self.kwargs: dict[str, Any] = {}
        self.ranks: dict[str, list[int]] = {}

    @property
    def timeout_minutes(self) -> int:
        seconds = default_timeout(self.backend).total_seconds()
        return max(1, math.ceil(seconds / 60))

    def build(self, model: Any) -> None:
        """NeMo's set-up, recorded. megatron's groups get the package's collective bound
        (``NCL_PG_TIMEOUT_S``) where NeMo leaves megatron's 30-minute default."""
        extra = {"distributed_timeout_minutes": self.timeout_minutes}
        with nemo_parallel.recording(extra) as kwargs:
            nemo_parallel.init_model_parallel(model)
        if not kwargs:
            raise RuntimeError("NeMo did not set up megatron's parallel state (AppState has no "
                               "model-parallel size): the strategy must be a MegatronStrategy")
        self.kwargs = dict(kwargs)
        self.ranks = group_ranks()

    def rebuild(self) -> parallel.Coordinates:
        """Megatron's set-up on the current world, with the recorded arguments."""
        from megatron.core import parallel_state as ps

        if not self.kwargs:
            raise RuntimeError("no recorded parallel layout to rebuild")
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(**self.kwargs)
        self.check()
        nemo_parallel.refresh_app_state()
        return parallel.coordinates()

    def check(self) -> None:
        now = group_ranks()
        if now == self.ranks:
            return
        diff = sorted(r for r in set(now) | set(self.ranks) if now.get(r) != self.ranks.get(r))
        details = "; ".join(f"{r}: {self.ranks.get(r)} at start, {now.get(r)} now" for r in diff)
        raise RuntimeError(f"the rebuilt parallel state differs from the one NeMo built at "
                           f"start ({details})")
