"""Append-only JSON-lines files and atomic JSON documents in the run directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class JsonlWriter:
    """One JSON object per line, flushed as written; a no-op when ``enabled`` is False."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._file = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def truncate_after(self, step: int) -> int:
        """Drop the records of steps after ``step`` (a rollback); returns how many."""
        if not self.enabled:
            return 0
        self.close()
        rows = read_jsonl(self.path) if self.path.exists() else []
        keep = [r for r in rows if r["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        return len(rows) - len(keep)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All records of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
