"""What ``peers.py`` reads from the peer libraries' timelines, and the lines it prints.

Every worker writes ``<run>/<source>.jsonl`` (``peers/common.py`` ``Timeline``): the
originals are ``replica0..3`` (torchft) or ``rank0..4`` (nvrx, rank 4 the spare); a
replacement is ``replica<R>_restarted`` (cold, started after the kill) or ``standby``
(warm, started with the job). Pure functions, unit-tested in
``tests/unit/test_bench_peers_report.py``.
"""

from __future__ import annotations

import re
from typing import Any, Optional

ORIGINAL = re.compile(r"^(replica|rank)\d+$")


def is_replacement(source: str) -> bool:
    return source.endswith("_restarted") or source == "standby"


def _since(events: list[dict], kill: dict, pick) -> Optional[float]:
    hit = next((e for e in events if pick(e)), None)
    return round(hit["t"] - kill["t"], 3) if hit else None


def final_hashes(events: list[dict]) -> set[str]:
    return {e["sha256"] for e in events if e["event"] == "final"}


def measure(events: list[dict], ref_events: list[dict], lib: str) -> dict[str, Any]:
    """Kill -> first step after it, from the timelines; exactness against the reference.

    ``survivors_first_step_s``: the first step a surviving original process completes
    after the killed one (the healthy ranks may still commit the killed step itself: their
    all-reduce had completed, which is no sign of recovery). torchft:
    ``replacement_first_step_s``, the replacement's first step inside a quorum with the
    survivors (healed, or with other participants); one that starts after they finished
    trains alone from step 0 and proves nothing, and then it stays None.
    """
    kill = next(e for e in events if e["event"] == "kill")
    after = [e for e in events if e["event"] == "step" and e["t"] > kill["t"]
             and e["step"] > kill["step"]]
    hashes, ref = final_hashes(events), final_hashes(ref_events)
    out: dict[str, Any] = {
        "survivors_first_step_s": _since(after, kill, lambda e: ORIGINAL.match(e["source"])),
        "first_step_s": _since(after, kill, lambda e: True),
        "ranks_agree": len(hashes) == 1, "exact": len(ref) == 1 and hashes == ref,
        "kill_step_index": kill["step"]}
    if lib == "torchft":
        out["replacement_first_step_s"] = _since(
            after, kill, lambda e: is_replacement(e["source"])
            and (e.get("healed") or e.get("participants", 0) > 1))
        out["participants_per_step"] = [e["participants"] for e in events
                                        if e["event"] == "step" and e["source"] == "replica0"]
        released = [e for e in events if e["event"] == "released"]
        out["replacement"] = "warm (started with the job)" if released else "cold"
    else:
        starts = [e for e in events if e["event"] == "fn_start" and e["t"] > kill["t"]]
        out["spare_had_state"] = any(e["has_state"] for e in starts if e["source"] == "rank4")
        out["restart_iteration"] = max((e["iteration"] for e in starts), default=0)
    return out


def seconds(value: Optional[float]) -> str:
    return "no figure" if value is None else f"{value:.2f} s"


def exact_text(r: dict) -> str:
    return "exact" if r.get("exact") else "not exact"


def torchft_line(variant: str, label: str, r: dict) -> str:
    if "error" in r:
        return f"torchft {variant} ({label}): {r['error']}"
    return (f"torchft {variant} ({label}): survivors resume {seconds(r['survivors_first_step_s'])}"
            f", healed replacement ({r.get('replacement', '?')}) back "
            f"{seconds(r.get('replacement_first_step_s'))}; {exact_text(r)}")


def nvrx_line(variant: str, label: str, r: dict, gloo_timeout_s: float) -> str:
    if "error" in r:
        return f"nvidia-resiliency-ext {variant} ({label}): {r['error']}"
    s = r["first_step_s"]
    share = f", {100 * gloo_timeout_s / s:.0f}% of it" if s else ""
    return (f"nvidia-resiliency-ext {variant} ({label}): {seconds(s)}, dominated by the "
            f"{gloo_timeout_s:.0f} s gloo timeout this script sets{share} (on gloo the "
            f"library's abort wakes no rank blocked in a collective with the dead one: it "
            f"waits for gloo's timeout); {exact_text(r)}")
