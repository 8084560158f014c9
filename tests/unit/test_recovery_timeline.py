"""The recovery record (metrics/timeline.py -> events.jsonl -> summary's recoveries),
above all for a recovery whose generation is superseded before its first step."""

from __future__ import annotations

import json
from datetime import timedelta

import torch.distributed as dist

from nemo_checkpointless.metrics.events import EventLog, read_events, summarize_recoveries
from nemo_checkpointless.metrics.timeline import RecoveryTimeline


def peers(nbytes: int, seconds: float, replacements: list[int], step: int = 3) -> dict:
    return {"bytes": nbytes, "seconds": seconds, "raw_send_seconds": None,
            "replacements": replacements, "rolled_forward": [], "committed_step": step}


def store_with(gens: dict[int, dict]) -> dist.HashStore:
    store = dist.HashStore()
    store.set_timeout(timedelta(milliseconds=50))  # a missing record: no detect phase
    for g, record in gens.items():
        store.set(f"gen/{g}", json.dumps(record))
    return store


def recovery_record(tmp_path, timeline: RecoveryTimeline, store) -> dict:
    events = EventLog(tmp_path / "events.jsonl", rank=0)
    timeline.finish(events, store, step=4, lead=True)
    (rec,) = summarize_recoveries(read_events(tmp_path / "events.jsonl"))
    return rec


def test_one_attempt_records_its_transfer(tmp_path):
    t = RecoveryTimeline(from_gen=0)
    t.mark("abort", 0.01)
    t.joined(1, 0.2, 0.1, 0.3, peers(4000, 0.25, [2, 3]))
    rec = recovery_record(tmp_path, t, store_with({1: {"fault_at": 1.0, "detected_at": 1.5}}))
    assert rec["generation"] == 1 and rec["attempts"] == 1
    assert rec["bytes_transferred"] == 4000
    assert rec["phases"]["detect"] == 0.5
    assert set(rec["phases"]) == {"detect", "abort", "rendezvous", "group_rebuild",
                                  "state_transfer", "first_step"}


def test_superseded_generation_keeps_the_bytes_its_transfer_moved(tmp_path):
    """Generation 1 moves the lost ranks' state, then generation 2 supersedes it before a
    step (a standby's claim announced late): generation 2 finds every rank holding state
    and moves nothing. The recovery moved the bytes all the same (the CI defect of stop
    28: the record read 0)."""
    t = RecoveryTimeline(from_gen=0)
    t.mark("abort", 0.01)
    t.wait_generation = 0.05
    t.joined(1, 0.2, 0.1, 0.3, peers(4000, 0.25, [2, 3]))
    t.mark("abort", 0.02)  # the second attempt aborts again
    t.wait_generation = 0.5
    t.joined(2, 0.1, 0.05, 0.02, peers(0, 0.0, []))
    rec = recovery_record(tmp_path, t, store_with({1: {"detected_at": 2.0},
                                                   2: {"detected_at": 3.0}}))
    assert rec["generation"] == 2 and rec["attempts"] == 2
    assert rec["bytes_transferred"] == 4000
    phases = rec["phases"]
    assert abs(phases["abort"] - 0.03) < 1e-9
    assert abs(phases["rendezvous"] - (0.25 + 0.6)) < 1e-9  # each attempt's wait counted once
    assert abs(phases["state_transfer"] - 0.32) < 1e-9
    transfer = next(e for e in read_events(tmp_path / "events.jsonl")
                    if e["phase"] == "state_transfer")
    assert transfer["replacements"] == [2, 3]
    assert transfer["mb_per_s"] == 4000 / 1e6 / 0.25


def test_peer_attempt_then_disk_rollback_records_both(tmp_path):
    t = RecoveryTimeline(from_gen=0)
    t.joined(1, 0.1, 0.1, 0.2, peers(1000, 0.1, [1]))
    t.joined(2, 0.1, 0.1, 0.4, {"bytes": 9000, "seconds": 0.4, "source": "disk",
                                "checkpoint_step": 3, "replacements": [0, 2],
                                "committed_step": 3})
    rec = recovery_record(tmp_path, t, store_with({}))
    assert rec["bytes_transferred"] == 1000
    assert rec["bytes_loaded"] == 9000 and rec["checkpoint_step"] == 3
    assert "detect" not in rec["phases"]  # no generation record: no detection time


def test_only_the_lead_rank_writes(tmp_path):
    t = RecoveryTimeline(from_gen=0)
    t.joined(1, 0.1, 0.1, 0.2, peers(1000, 0.1, [1]))
    t.finish(EventLog(tmp_path / "events.jsonl", rank=1), store_with({}), step=4, lead=False)
    assert read_events(tmp_path / "events.jsonl") == []
