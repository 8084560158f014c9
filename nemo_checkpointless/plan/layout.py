"""Where every optimizer shard's replicas live, computed with megatron's own rank generator.

No process group is needed: the groups are the ones ``initialize_model_parallel`` would
build for the same sizes (megatron-core 0.16, ``order="tp-cp-ep-dp-pp"``):

* ``tp``, ``pp``, ``dp-cp`` groups: ``RankGenerator(...).get_ranks(token)``.
* The intra-instance group (distributed optimizer with ``k`` instances): the ``dp-cp``
  group cut into ``k`` consecutive chunks of ``dp*cp/k`` ranks
  (``_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP``).
* The inter-instance group (``get_inter_distributed_optimizer_instance_group()``): built
  from the expert generator's ``dp`` groups by ``create_hierarchical_groups`` with sizes
  ``[dp*cp/k, k]``; its level-1 groups are ``ranks[u::dp*cp/k]``, the ranks at the same
  position ``u`` of every instance. Both generators are evaluated and checked to agree.

A rank's optimizer shard key is ``(tp, pp, position inside its instance)`` as in
:func:`nemo_checkpointless.megatron.shards.shard_key`; ranks with equal keys hold
byte-identical optimizer state. Ranks sit on nodes contiguously (node ``n`` holds ranks
``n*R .. (n+1)*R-1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

from ..config import ConfigError, RunConfig, check_layout

ORDER = "tp-cp-ep-dp-pp"  # megatron's default, the one parallel.initialize uses
ShardKey = tuple[int, int, int]  # (tp rank, pp rank, position inside the optimizer instance)


class PlanError(ConfigError):
    """A layout that cannot be planned; the message says what to change."""


@dataclass(frozen=True, kw_only=True)
class Layout:
    """The sizes that decide where replicas live."""

    world_size: int
    ranks_per_node: int
    tp: int
    pp: int
    cp: int
    vp: Optional[int] = None
    instances: int = 1               # strategy.num_distributed_optimizer_instances (k)
    distributed_optimizer: bool = True

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def dp_cp(self) -> int:
        return self.dp * self.cp

    @property
    def instance_size(self) -> int:
        """Ranks that shard one copy of the optimizer state (dp*cp/k; dp*cp for plain)."""
        return self.dp_cp // self.instances if self.distributed_optimizer else 1

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    @classmethod
    def from_config(cls, cfg: RunConfig, world_size: int, ranks_per_node: int) -> "Layout":
        s = cfg.strategy
        layout = cls(world_size=world_size, ranks_per_node=ranks_per_node,
                     tp=s.tensor_model_parallel_size, pp=s.pipeline_model_parallel_size,
                     cp=s.context_parallel_size, vp=s.virtual_pipeline_model_parallel_size,
                     instances=s.num_distributed_optimizer_instances,
                     distributed_optimizer=s.use_distributed_optimizer)
        m = cfg.model
        layout.check(m.num_layers, heads=m.num_attention_heads,
                     query_groups=m.num_query_groups or m.num_attention_heads,
                     ffn=m.ffn_hidden_size or 4 * m.hidden_size)
        return layout

    def check(self, num_layers: Optional[int] = None, *, heads: Optional[int] = None,
              query_groups: Optional[int] = None, ffn: Optional[int] = None) -> None:
        """Raise :class:`PlanError` naming the fix if megatron would refuse this layout
        (``config.check_layout``, the one layout check of the package)."""
        check_layout(world_size=self.world_size, tp=self.tp, pp=self.pp, cp=self.cp,
                     vp=self.vp, instances=self.instances,
                     distributed_optimizer=self.distributed_optimizer, num_layers=num_layers,
                     heads=heads, query_groups=query_groups, ffn=ffn,
                     ranks_per_node=self.ranks_per_node, error=PlanError)


def megatron_groups(layout: Layout) -> dict[str, list[list[int]]]:
    """The rank groups megatron's ``initialize_model_parallel`` builds for ``layout``.

    Keys: ``tp``, ``pp``, ``dp_cp``, ``intra_instance``, ``inter_instance`` (the latter
    two as megatron returns them; with one instance the intra group is the dp-cp group and
    megatron builds no inter group, listed here as one-rank groups).
    """
    from megatron.core.parallel_state import RankGenerator

    gen = RankGenerator(tp=layout.tp, ep=1, dp=layout.dp, pp=layout.pp, cp=layout.cp,
                        order=ORDER, rank_offset=0)
    expert = RankGenerator(tp=layout.tp, ep=1, dp=layout.dp_cp, pp=layout.pp, cp=1,
                           order=ORDER, rank_offset=0)
    dp_cp = gen.get_ranks("dp-cp")
    size = layout.dp_cp // layout.instances
    intra = [g[i * size:(i + 1) * size] for g in dp_cp for i in range(layout.instances)]
    # expert dp group -> create_hierarchical_groups(ranks, [size, k]): level 0 = consecutive
    # chunks (must equal the intra groups above), level 1 = ranks[u::size]
    expert_dp = expert.get_ranks("dp")
    expert_intra = [g[i * size:(i + 1) * size] for g in expert_dp for i in range(layout.instances)]
    if sorted(expert_intra) != sorted(intra):  # pragma: no cover - a megatron change
        raise RuntimeError("megatron's decoder and expert generators disagree on the "
                           "distributed-optimizer instances; the planner needs updating")
    inter = [g[u::size] for g in expert_dp for u in range(size)]
    return {"tp": gen.get_ranks("tp"), "pp": gen.get_ranks("pp"), "dp_cp": dp_cp,
            "intra_instance": intra, "inter_instance": inter}


@dataclass(frozen=True)
class ReplicaMap:
    """Every optimizer shard key and the ranks holding it."""

    layout: Layout
    holders: dict[ShardKey, tuple[int, ...]]
    key_of: tuple[ShardKey, ...]     # indexed by rank

    def lost_shards(self, dead: Iterable[int]) -> list[ShardKey]:
        """Shard keys with no live holder after ``dead`` ranks are gone."""
        gone = set(dead)
        bad = [r for r in gone if not 0 <= r < self.layout.world_size]
        if bad:
            raise PlanError(f"ranks {sorted(bad)} do not exist in a world of "
                            f"{self.layout.world_size}")
        keys = {self.key_of[r] for r in gone}
        return sorted(k for k in keys if all(h in gone for h in self.holders[k]))

    def survives(self, dead: Iterable[int]) -> bool:
        """True iff peers alone (no storage) can rebuild every rank in ``dead``."""
        return not self.lost_shards(dead)

    def node_ranks(self, node: int) -> range:
        r = self.layout.ranks_per_node
        return range(node * r, (node + 1) * r)

    def unprotected_ranks(self) -> list[int]:
        """Ranks whose shard exists nowhere else (a single loss needs storage)."""
        return sorted(h[0] for h in self.holders.values() if len(h) == 1)


def replica_map(layout: Layout) -> ReplicaMap:
    """Shard keys and holders for ``layout`` (distributed or plain optimizer)."""
    groups = megatron_groups(layout)
    world = layout.world_size
    tp_rank, pp_rank, position = [0] * world, [0] * world, [0] * world
    for g in groups["tp"]:
        for i, r in enumerate(g):
            tp_rank[r] = i
    for g in groups["pp"]:
        for i, r in enumerate(g):
            pp_rank[r] = i
    if layout.distributed_optimizer:
        for g in groups["intra_instance"]:
            for i, r in enumerate(g):
                position[r] = i
        sets = groups["inter_instance"]
    else:
        sets = groups["dp_cp"]  # plain optimizer: every DP x CP peer holds the full state
    key_of = tuple((tp_rank[r], pp_rank[r], position[r]) for r in range(world))
    holders: dict[ShardKey, tuple[int, ...]] = {}
    for g in sets:
        key = key_of[g[0]]
        if key in holders or any(key_of[r] != key for r in g):  # pragma: no cover
            raise RuntimeError(f"replica group {g} does not hold one shard key")
        holders[key] = tuple(sorted(g))
    return ReplicaMap(layout, holders, key_of)


@dataclass(frozen=True)
class LossSummary:
    """Which whole-node losses peers survive without storage."""

    num_nodes: int
    unprotected_ranks: tuple[int, ...]
    fatal_nodes: tuple[int, ...]              # losing this node alone loses a shard
    fatal_pairs: tuple[tuple[int, int], ...]  # both nodes survivable alone, not together

    @property
    def node_pairs(self) -> int:
        return math.comb(self.num_nodes, 2)

    @property
    def fatal_pair_count(self) -> int:
        """Two-node losses that lose a shard (pairs with a fatal node, plus fatal_pairs)."""
        safe = self.num_nodes - len(self.fatal_nodes)
        return self.node_pairs - math.comb(safe, 2) + len(self.fatal_pairs)


def analyze_losses(rmap: ReplicaMap) -> LossSummary:
    """Single-node and two-node verdicts from the nodes each shard's holders sit on.

    Losing a set of nodes loses a shard iff every holder's node is in the set, so only
    shards held on one or two nodes matter: O(shards), not O(nodes^2) loss checks.
    """
    layout = rmap.layout
    fatal_nodes: set[int] = set()
    pairs: set[tuple[int, int]] = set()
    for ranks in rmap.holders.values():
        nodes = sorted({layout.node_of(r) for r in ranks})
        if len(nodes) == 1:
            fatal_nodes.add(nodes[0])
        elif len(nodes) == 2:
            pairs.add((nodes[0], nodes[1]))
    pairs = {p for p in pairs if p[0] not in fatal_nodes and p[1] not in fatal_nodes}
    return LossSummary(num_nodes=layout.num_nodes,
                       unprotected_ranks=tuple(rmap.unprotected_ranks()),
                       fatal_nodes=tuple(sorted(fatal_nodes)),
                       fatal_pairs=tuple(sorted(pairs)))
