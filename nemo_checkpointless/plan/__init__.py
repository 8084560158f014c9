"""Layout planner: where optimizer-shard replicas live, which losses peers survive without
storage, and what the replicas cost in GPU memory.

    python -m nemo_checkpointless.plan recipe=llama3_70b trainer.num_nodes=16 trainer.devices=8

At job start the same plan is the pre-flight check::

    from nemo_checkpointless.plan import plan_layout, preflight_report
    plan = plan_layout(cfg, world_size, ranks_per_node)   # structured (LayoutPlan)
    log.warning(render(plan))        # == preflight_report(cfg, world_size, ranks_per_node)

Modules: ``layout`` (megatron's groups, replica sets, loss verdicts), ``memory``
(parameters per stage, optimizer bytes), ``report`` (the text), ``__main__`` (the CLI).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

from ..config import RunConfig
from .layout import (Layout, LossSummary, PlanError, ReplicaMap, analyze_losses,
                     megatron_groups, replica_map)
from .memory import MemoryEstimate, estimate, stage_parameters, total_parameters
from .report import render

__all__ = ["Layout", "LayoutPlan", "LossSummary", "MemoryEstimate", "PlanError",
           "ReplicaMap", "analyze_losses", "megatron_groups", "plan_layout",
           "preflight_report", "render", "replica_map", "stage_parameters",
           "total_parameters"]


@dataclass(frozen=True)
class LayoutPlan:
    """Everything the planner knows about one layout (see :func:`plan_layout`)."""

    name: str
    layout: Layout
    replicas: ReplicaMap
    losses: LossSummary
    memory: MemoryEstimate
    memory_if_two: Optional[MemoryEstimate]  # the same layout with 2 instances, if it has 1
    params_dtype: str
    fallback: str                            # checkpointless.fallback

    @property
    def protected(self) -> bool:
        """Every single-rank loss is survivable from peers."""
        return not self.losses.unprotected_ranks

    def survives(self, dead_ranks: Iterable[int]) -> bool:
        """Can peers alone rebuild all of ``dead_ranks`` (lost at once)?"""
        return self.replicas.survives(dead_ranks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (for events.jsonl); size grows with ranks, not rank pairs."""
        lay, loss, mem = self.layout, self.losses, self.memory
        pp = range(lay.pp)
        return {
            "name": self.name, "world_size": lay.world_size,
            "ranks_per_node": lay.ranks_per_node, "num_nodes": lay.num_nodes,
            "tp": lay.tp, "pp": lay.pp, "vp": lay.vp, "cp": lay.cp, "dp": lay.dp,
            "instances": lay.instances, "distributed_optimizer": lay.distributed_optimizer,
            "shards": len(self.replicas.holders),
            "holders_per_shard": sorted({len(h) for h in self.replicas.holders.values()}),
            "unprotected_ranks": list(loss.unprotected_ranks),
            "single_node_survivable": loss.num_nodes - len(loss.fatal_nodes),
            "fatal_nodes": list(loss.fatal_nodes),
            "node_pairs": loss.node_pairs,
            "two_node_survivable": loss.node_pairs - loss.fatal_pair_count,
            "fatal_pairs": [list(p) for p in loss.fatal_pairs],
            "stage_params_per_rank": list(mem.stage_params),
            "optimizer_bytes_per_rank": [mem.state_bytes(s) for s in pp],
            "extra_bytes_per_rank": [mem.extra_bytes(s) for s in pp],
        }


def plan_layout(cfg: RunConfig, world_size: int, ranks_per_node: int) -> LayoutPlan:
    """Plan ``cfg``'s strategy on ``world_size`` ranks, ``ranks_per_node`` to a node.

    Raises :class:`PlanError` (a ``ConfigError``) naming the fix for a layout megatron
    would refuse. Needs no process group and no GPU; ~0.1 s at 10,000 ranks.
    """
    layout = Layout.from_config(cfg, world_size, ranks_per_node)
    rmap = replica_map(layout)
    seq = cfg.data.seq_length
    two = None
    if layout.distributed_optimizer and layout.instances == 1 and layout.dp_cp % 2 == 0:
        two = estimate(cfg.model, layout, seq, instances=2)
    return LayoutPlan(name=cfg.name, layout=layout, replicas=rmap,
                      losses=analyze_losses(rmap), memory=estimate(cfg.model, layout, seq),
                      memory_if_two=two, params_dtype=cfg.model.params_dtype,
                      fallback=cfg.checkpointless.fallback)


def preflight_report(cfg: RunConfig, world_size: int, ranks_per_node: int,
                     verbose: bool = False) -> str:
    """The planner's text for this job (what ``python -m nemo_checkpointless.plan`` prints).

    For an unprotected layout it contains ``ranks [...] hold optimizer shards with no
    replica`` and the setting that fixes it.
    """
    return render(plan_layout(cfg, world_size, ranks_per_node), verbose=verbose)
