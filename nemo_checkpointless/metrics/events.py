"""events.jsonl: one line per fault and per recovery phase, and the summary's recoveries."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional


class EventLog:
    """Appends one JSON line per event. Safe across processes (O_APPEND, one write each)."""

    def __init__(self, path: Path, rank: int) -> None:
        self.path = Path(path)
        self.rank = rank
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> None:
        record = {"t": time.time(), "event": event, "rank": self.rank, **fields}
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def read_events(path: Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        return []
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def summarize_recoveries(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per recovery: total_s (fault to first step after it), phases, bytes."""
    out: list[dict[str, Any]] = []
    current: Optional[dict[str, Any]] = None
    for e in events:
        if e["event"] == "recovery_phase":
            if current is None or current["generation"] != e["generation"]:
                current = {"generation": e["generation"], "phases": {},
                           "bytes_transferred": 0, "total_s": None}
                out.append(current)
            current["phases"][e["phase"]] = e["duration_s"]
            if e["phase"] == "state_transfer":
                current["bytes_transferred"] = e.get("bytes", 0)
            if e["phase"] == "checkpoint_load":
                current["bytes_loaded"] = e.get("bytes", 0)
                current["checkpoint_step"] = e.get("checkpoint_step")
            if e["phase"] == "first_step":
                current["total_s"] = e.get("total_s")
                current["resumed_step"] = e.get("step")
                current["attempts"] = e.get("attempts", 1)
    return out
