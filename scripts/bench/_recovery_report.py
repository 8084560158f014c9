"""What ``recovery.py`` reports, strict figure first: the ratios, the layout, the state size.

Pure functions of numbers the runs wrote (``summary.json``, ``events.jsonl``,
``restart_events.jsonl``), kept apart from the runs so they are unit-tested
(``tests/unit/test_bench_recovery_report.py``).
"""

from __future__ import annotations

from typing import Any, Optional


def ratios(ours_total_s: float, restart_total_s: float, fault_free_step_s: float) -> dict[str, float]:
    """Checkpointless over checkpoint-restart, two ways, the strict one first.

    Both totals run from the kill to the end of the first step not committed at the kill,
    so each holds one step of new work. ``ratio_of_totals`` keeps that step on both sides;
    ``ratio_one_step_subtracted`` takes one fault-free step off both (the recovery time
    proper), which favours the side whose total is mostly that step.
    """
    if restart_total_s <= 0:
        raise ValueError(f"checkpoint-restart total {restart_total_s} s: not a measurement")
    ours_rec = ours_total_s - fault_free_step_s
    restart_rec = restart_total_s - fault_free_step_s
    if restart_rec <= 0:
        raise ValueError(f"checkpoint-restart total {restart_total_s:.3f} s is not longer than "
                         f"one fault-free step ({fault_free_step_s:.3f} s): no recovery to "
                         "compare; check the restart run")
    return {"ratio_of_totals": ours_total_s / restart_total_s,
            "ratio_one_step_subtracted": ours_rec / restart_rec,
            "ours_recovery_s": ours_rec, "restart_recovery_s": restart_rec}


def dp_only(layout: dict[str, Any]) -> bool:
    """Every rank builds the same model (no TP, PP, CP or virtual pipeline): the layout
    where a warm spare builds its model ahead, before it knows its rank."""
    return (layout.get("tp", 1) == 1 and layout.get("pp", 1) == 1
            and layout.get("cp", 1) == 1 and not layout.get("vp"))


def layout_text(layout: dict[str, Any], world_size: Optional[int] = None) -> str:
    """``summary.json`` ``layout`` in words, saying whether the spare prebuilt its model."""
    parts = [f"{k.upper()}={layout[k]}" for k in ("dp", "tp", "pp", "cp") if k in layout]
    instances = layout.get("num_distributed_optimizer_instances", 1)
    text = ", ".join(parts)
    if world_size is not None:
        text = f"{world_size} ranks, {text}"
    text += (f", {instances} distributed-optimizer instance"
             + ("s" if instances != 1 else ""))
    if dp_only(layout):
        return text + " (DP-only: the warm spare builds its model ahead)"
    return text + " (model split across ranks: the spare builds its model once assigned)"


def state_sizes(state_bytes_all_ranks: int, instances: int) -> dict[str, float]:
    """Optimizer state in MB: one copy, and what the ranks hold with the replicas.

    ``state_bytes_all_ranks``: the fp32 main parameters and Adam moments of every rank,
    summed (the restart run's ``checkpoint_loaded`` ``bytes``); with ``instances``
    distributed-optimizer instances that sum holds ``instances`` copies.
    """
    if instances < 1:
        raise ValueError(f"instances={instances}: at least 1")
    return {"state_mb": state_bytes_all_ranks / instances / 1e6,
            "state_mb_with_replicas": state_bytes_all_ranks / 1e6, "copies": instances}


def state_text(sizes: dict[str, float]) -> str:
    """'X MB of optimizer state, 2X MB with the replica' (or 'no replica')."""
    one, held, copies = sizes["state_mb"], sizes["state_mb_with_replicas"], sizes["copies"]
    if copies == 1:
        return f"{one:.0f} MB of optimizer state (no replica)"
    what = "the replica" if copies == 2 else f"{copies - 1} replicas"
    return f"{one:.0f} MB of optimizer state, {held:.0f} MB with {what}"


def headline(r: dict[str, float], ours_s: float, restart_s: float, free_step_s: float,
             target_step: int, target: float = 0.10) -> list[str]:
    """The printed lines, strict figure first, both labelled."""
    return [
        f"ratio of totals (strict; kill -> end of step {target_step}, the first step not "
        f"committed at the kill, on both sides): {r['ratio_of_totals']:.3f} = "
        f"{ours_s:.2f} s / {restart_s:.2f} s (target <= {target:.2f}: "
        f"{'met' if r['ratio_of_totals'] <= target else 'missed'})",
        f"ratio with one fault-free step ({free_step_s:.2f} s) subtracted from both: "
        f"{r['ratio_one_step_subtracted']:.3f} = {r['ours_recovery_s']:.2f} s / "
        f"{r['restart_recovery_s']:.2f} s (target <= {target:.2f}: "
        f"{'met' if r['ratio_one_step_subtracted'] <= target else 'missed'})",
    ]
