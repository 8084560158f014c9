"""scripts/bench/_peers_report.py: torchft's survivors and its healed replacement timed
apart from the timelines, and nvrx's figure printed with the gloo timeout behind it."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "bench"))
import _peers_report as report  # noqa: E402


def ev(source: str, event: str, t: float, **fields) -> dict:
    return {"source": source, "event": event, "t": t, **fields}


def torchft_timeline(warm: bool) -> list[dict]:
    new = "standby" if warm else "replica1_restarted"
    events = [ev(f"replica{r}", "step", 1.0, step=2, participants=4, healed=False)
              for r in range(4)]
    events += [ev("replica1", "kill", 2.0, step=3),
               # a survivor still commits the killed step: no sign of recovery
               ev("replica0", "step", 2.2, step=3, participants=4, healed=False),
               ev("replica0", "step_discarded", 2.5, step=4, participants=3, healed=False),
               ev("replica2", "step", 3.4, step=4, participants=4, healed=False),
               ev(new, "step", 3.9, step=4, participants=4, healed=True)]
    if warm:
        events.insert(0, ev("standby", "standby_ready", 0.5))
        events.append(ev("standby", "released", 2.05, replica=1))
    events += [ev(s, "final", 9.0, sha256="abc") for s in
               ("replica0", "replica2", "replica3", new)]
    return sorted(events, key=lambda e: e["t"])


def test_torchft_survivors_and_the_healed_replacement_are_timed_apart():
    ref = [ev("replica0", "final", 1.0, sha256="abc")]
    for warm in (False, True):
        out = report.measure(torchft_timeline(warm), ref, "torchft")
        assert out["survivors_first_step_s"] == 1.4
        assert out["replacement_first_step_s"] == 1.9
        assert out["exact"] and out["ranks_agree"]
        assert out["replacement"] == ("warm (started with the job)" if warm else "cold")
    line = report.torchft_line("warm", "tuned, min_replicas=4, warm replacement",
                               report.measure(torchft_timeline(True), ref, "torchft"))
    assert "survivors resume 1.40 s" in line and "healed replacement (warm" in line
    assert "back 1.90 s" in line


def test_a_replacement_training_alone_is_no_figure():
    events = [e for e in torchft_timeline(False) if e["source"] != "replica1_restarted"]
    events.append(ev("replica1_restarted", "step", 8.0, step=4, participants=1, healed=False))
    out = report.measure(sorted(events, key=lambda e: e["t"]), [], "torchft")
    assert out["replacement_first_step_s"] is None
    assert not out["exact"]
    assert "back no figure" in report.torchft_line("tuned", "x", out)


def test_nvrx_line_names_the_gloo_timeout_that_dominates_it():
    events = [ev("rank1", "kill", 10.0, step=3),
              ev("rank0", "fn_start", 30.5, iteration=1, rank=0, has_state=True),
              ev("rank4", "fn_start", 30.6, iteration=1, rank=1, has_state=False),
              ev("rank0", "step", 32.0, step=4, rank=0, iteration=1),
              ev("rank0", "final", 40.0, sha256="x")]
    out = report.measure(events, [ev("rank0", "final", 1.0, sha256="y")], "nvrx")
    assert out["first_step_s"] == 22.0 and out["survivors_first_step_s"] == 22.0
    assert out["spare_had_state"] is False and out["restart_iteration"] == 1
    line = report.nvrx_line("tuned", "tuned intervals", out, gloo_timeout_s=20.0)
    assert "22.00 s, dominated by the 20 s gloo timeout this script sets, 91% of it" in line
    assert "not exact" in line
