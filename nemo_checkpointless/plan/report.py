"""The planner's text: readable at 10,000 ranks (replica sets and fatal node pairs are
summarised by pattern; ``verbose`` lists every one)."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Iterable

from .layout import ReplicaMap, ShardKey
from .memory import GiB

if TYPE_CHECKING:
    from . import LayoutPlan

EXAMPLES = 6  # items shown per pattern without --verbose


def rank_list(ranks: Iterable[int]) -> str:
    """``[0, 1, 2, 3]`` for a few ranks, ``0-63, 128-191 (128 ranks)`` for many."""
    ranks = sorted(ranks)
    if len(ranks) <= 16:
        return str(ranks)
    spans: list[str] = []
    start = prev = ranks[0]
    for r in [*ranks[1:], None]:
        if r is None or r != prev + 1:
            spans.append(f"{start}-{prev}" if prev != start else str(start))
            start = r
        prev = r
    shown = ", ".join(spans[:8]) + (", ..." if len(spans) > 8 else "")
    return f"{shown} ({len(ranks)} ranks)"


def key_text(key: ShardKey) -> str:
    return f"tp={key[0]} pp={key[1]} pos={key[2]}"


def _offsets(values: Iterable[int], var: str) -> str:
    values = list(values)
    return "{" + ", ".join(var if v == values[0] else f"{var}+{v - values[0]}"
                           for v in values) + "}"


def _holders_text(rmap: ReplicaMap, key: ShardKey) -> str:
    ranks = rmap.holders[key]
    nodes = [rmap.layout.node_of(r) for r in ranks]
    return (f"{key_text(key)}: ranks {', '.join(map(str, ranks))} "
            f"(nodes {', '.join(map(str, nodes))})")


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 10 else f"{n / 2 ** 20:.2f} MiB"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}e9" if n >= 1e9 else f"{n / 1e6:.2f}e6"


def header(plan: "LayoutPlan") -> list[str]:
    lay = plan.layout
    vp = f" VP={lay.vp}" if lay.vp else ""
    if lay.distributed_optimizer:
        opt = (f"distributed optimizer, {lay.instances} instance"
               f"{'s' if lay.instances > 1 else ''} of DP*CP/{lay.instances} = "
               f"{_plural(lay.instance_size, 'rank')}")
    else:
        opt = "plain optimizer (full state on every DP x CP peer)"
    return [
        f"{plan.name} on {_plural(lay.num_nodes, 'node')} x "
        f"{_plural(lay.ranks_per_node, 'rank')} = {_plural(lay.world_size, 'rank')}",
        f"  TP={lay.tp} PP={lay.pp}{vp} CP={lay.cp} -> DP={lay.dp}; {opt}",
        f"  megatron rank order tp-cp-ep-dp-pp: rank = tp + {lay.tp}*cp + {lay.tp * lay.cp}*dp"
        f" + {lay.tp * lay.cp * lay.dp}*pp; node = rank // {lay.ranks_per_node}",
    ]


def replica_section(plan: "LayoutPlan", verbose: bool) -> list[str]:
    rmap = plan.replicas
    sizes = sorted({len(h) for h in rmap.holders.values()})
    each = " or ".join(map(str, sizes))
    source = ("megatron's inter-instance groups" if plan.layout.distributed_optimizer
              else "megatron's DP x CP groups")
    out = ["", "Replica sets of the optimizer shards (key: tp, pp, position in instance):"]
    if sizes == [1]:
        why = ("one optimizer instance" if plan.layout.dp_cp > 1
               else "DP x CP = 1: no data-parallel peer")
        return out + [f"  {len(rmap.holders)} shards, each on 1 rank only ({why}): "
                      "no replica sets"]
    out.append(f"  {len(rmap.holders)} shards, {each} ranks each ({source})")
    if verbose:
        out += [f"  {_holders_text(rmap, k)}" for k in sorted(rmap.holders)]
        return out
    patterns: dict[tuple[str, str], list[ShardKey]] = defaultdict(list)
    for key in sorted(rmap.holders):
        ranks = rmap.holders[key]
        nodes = sorted({plan.layout.node_of(r) for r in ranks})
        where = "one node" if len(nodes) == 1 else f"nodes {_offsets(nodes, 'n')}"
        patterns[(_offsets(ranks, "r"), where)].append(key)
    for (ranks, where), keys in list(patterns.items())[:EXAMPLES]:
        out.append(f"  {len(keys)} sets {ranks} on {where}, e.g. "
                   + "; ".join(_holders_text(rmap, k) for k in keys[:2]))
    if len(patterns) > EXAMPLES:
        out.append(f"  ... {len(patterns) - EXAMPLES} more patterns (--verbose lists every set)")
    else:
        out.append("  (--verbose lists every set)")
    return out


def loss_section(plan: "LayoutPlan", verbose: bool) -> list[str]:
    lay, loss, rmap = plan.layout, plan.losses, plan.replicas
    lonely = loss.unprotected_ranks
    if lonely:
        single = (f"no: ranks {rank_list(lonely)} hold optimizer shards with no replica")
    else:
        single = f"yes ({lay.world_size}/{lay.world_size} ranks)"
    nodes_ok = loss.num_nodes - len(loss.fatal_nodes)
    one_node = " (a one-node job)" if loss.num_nodes == 1 else ""
    out = ["", "Losses survivable without storage (every shard keeps a live holder):",
           f"  any one rank:  {single}",
           f"  one node:      {nodes_ok}/{_plural(loss.num_nodes, 'node')}{one_node}"]
    if loss.fatal_nodes and nodes_ok:
        out.append(f"                 fatal: nodes {rank_list(loss.fatal_nodes)}")
    if loss.num_nodes < 2:
        out.append("  two nodes:     -")
    else:
        ok = loss.node_pairs - loss.fatal_pair_count
        out.append(f"  two nodes:     {ok}/{loss.node_pairs} pairs")
        if loss.fatal_pairs:
            n = len(loss.fatal_pairs)
            besides = " besides those containing a fatal node" if loss.fatal_nodes else ""
            out.append(f"                 fatal{besides}: {n} pair{'s' if n > 1 else ''}")
            by_gap: dict[int, list[tuple[int, int]]] = defaultdict(list)
            for a, b in loss.fatal_pairs:
                by_gap[b - a].append((a, b))
            for gap, pairs in sorted(by_gap.items()):
                shown = pairs if verbose else pairs[:EXAMPLES]
                more = "" if len(shown) == len(pairs) else " ..."
                out.append(f"                 {{n, n+{gap}}} x {len(pairs)}: "
                           + " ".join(f"({a},{b})" for a, b in shown) + more)
            a, b = loss.fatal_pairs[0]
            dead = [*rmap.node_ranks(a), *rmap.node_ranks(b)]
            key = rmap.lost_shards(dead)[0]
            out.append(f"                 e.g. nodes {a}+{b} lose every copy of "
                       f"{_holders_text(rmap, key)}")
    if lonely or loss.fatal_nodes or loss.fatal_pairs:
        if plan.fallback == "disk":
            out.append("  losses marked fatal restore from the latest disk checkpoint "
                       "(checkpointless.fallback=disk)")
        else:
            out.append("  fatal losses are refused (\"no healthy rank holds a replica\"); "
                       "checkpointless.fallback=disk restores them from a disk checkpoint")
    return out


def memory_section(plan: "LayoutPlan") -> list[str]:
    lay, mem, alt = plan.layout, plan.memory, plan.memory_if_two
    dtype = plan.params_dtype
    what = ("fp32 main + exp_avg + exp_avg_sq" if mem.bytes_per_param == 12
            else "exp_avg + exp_avg_sq; fp32 params are their own main params")
    out = ["", "Optimizer state per rank (params counted per stage from the model config;",
           f"  {dtype} params: {what} = {mem.bytes_per_param} B/param):"]
    if not lay.distributed_optimizer:
        cols = ("replicated (1-way)", f"distributed, 1 instance ({mem.baseline_ways}-way)")
    elif lay.instances > 1:
        cols = (f"{lay.instances} instances ({mem.ways}-way)",
                f"1 instance ({mem.baseline_ways}-way)")
    elif alt is not None:
        cols = (f"1 instance ({mem.ways}-way)", f"2 instances ({alt.ways}-way)")
    else:
        cols = (f"1 instance ({mem.ways}-way)", "")
    out.append("  N-way: ranks that share one copy of the state; extra: the replicas' cost")
    out.append(f"  {'stage':<6} {'params/rank':>12}  {cols[0]:>22}"
               + (f"  {cols[1]:>28}  extra" if cols[1] else ""))
    for s in range(lay.pp):
        now = mem.state_bytes(s)
        if lay.instances == 1 and lay.distributed_optimizer:
            other = alt.state_bytes(s) if alt is not None else None
            extra = alt.extra_bytes(s) if alt is not None else None
        else:
            other, extra = mem.baseline_bytes(s), mem.extra_bytes(s)
        row = f"  {'pp' + str(s):<6} {_count(mem.stage_params[s]):>12}  {_gib(now):>22}"
        out.append(row + (f"  {_gib(other):>28}  +{_gib(extra)}" if other is not None else ""))
    worst = max(range(lay.pp), key=mem.extra_bytes)
    if lay.distributed_optimizer and lay.instances == 1:
        out.append("  extra GPU memory per rank for replicas: none (no replicas)"
                   + (f"; with 2 instances up to +{_gib(alt.max_extra_bytes)}"
                      if alt is not None else ""))
    else:
        out.append(f"  extra GPU memory per rank for the replicas: up to "
                   f"+{_gib(mem.max_extra_bytes)} (stage pp{worst})")
    return out


def advice_section(plan: "LayoutPlan") -> list[str]:
    lay, loss = plan.layout, plan.losses
    out: list[str] = []
    if loss.unprotected_ranks:
        if lay.dp_cp == 1:
            out.append("DP x CP = 1: no rank has a data-parallel peer, so no replica can "
                       "exist; use checkpointless.fallback=disk, or launch more ranks per "
                       f"model replica (a multiple of TP*PP*CP = {lay.tp * lay.pp * lay.cp}).")
        else:
            k = min(d for d in range(2, lay.dp_cp + 1) if lay.dp_cp % d == 0)
            cost = (f": +{_gib(plan.memory_if_two.max_extra_bytes)} per rank"
                    if k == 2 and plan.memory_if_two else "")
            out.append(f"set strategy.num_distributed_optimizer_instances={k} (DP x CP = "
                       f"{lay.dp_cp} is divisible by {k}){cost}, or accept "
                       "checkpointless.fallback=disk.")
    elif loss.fatal_nodes and loss.num_nodes > 1:
        stride = lay.tp * lay.instance_size
        out.append(f"every copy of some shards sits on one node (copies are {stride} ranks "
                   f"apart, a node holds {lay.ranks_per_node}); spread them over nodes with a "
                   "larger DP (more nodes), or use checkpointless.fallback=disk.")
    return ["", "What to do: " + out[0]] if out else []


def render(plan: "LayoutPlan", verbose: bool = False) -> str:
    lines = [*header(plan), *replica_section(plan, verbose), *loss_section(plan, verbose),
             *memory_section(plan), *advice_section(plan)]
    return "\n".join(lines)
