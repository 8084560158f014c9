"""Lightning loggers under recovery: each row written once, none lost with a dead rank 0.

Only global rank 0 writes what Lightning's loggers get. Every rank passes through
:meth:`LoggerGuard.log_metrics` (Lightning calls ``log_metrics`` on every rank; the
loggers' own ``rank_zero_only`` makes it a no-op elsewhere), so every rank's journal
keeps each row. Rank 0 flushes the logger after each row (a SIGKILL loses nothing
written), and drops values already on disk for the same step and key. A replacement
rank 0 reads what its predecessor wrote (CSV's ``metrics.csv``, TensorBoard's event
files) and writes the rows it finds missing from its peers' journals, before training
on. Other logger types are written to at least once around a rank-0 failure.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from typing import Any, Callable, Optional

from .journal import Journal

log = logging.getLogger(__name__)

Key = tuple[int, str]


def written(logger: Any) -> Optional[set[Key]]:
    """(step, key) already in ``logger``'s files, or None for a logger type we cannot read."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if isinstance(logger, CSVLogger):
        return _csv_rows(os.path.join(logger.log_dir, "metrics.csv"))
    if isinstance(logger, TensorBoardLogger):
        return _tensorboard_rows(logger.log_dir)
    return None


def _csv_rows(path: str) -> set[Key]:
    found: set[Key] = set()
    if not os.path.exists(path):
        return found
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = row.get("step")
            if step in (None, ""):
                continue
            for key, value in row.items():
                if key != "step" and value not in (None, ""):
                    found.add((int(float(step)), key))
    return found


def _tensorboard_rows(log_dir: str) -> set[Key]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    found: set[Key] = set()
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        try:
            for event in EventFileLoader(path).Load():
                for value in event.summary.value:
                    found.add((int(event.step), value.tag))
        except Exception as err:  # noqa: BLE001 - a torn last record: keep what was read
            log.warning("reading %s stopped early: %s", path, err)
    return found


class LoggerGuard:
    """Wraps every logger's ``log_metrics`` of one trainer (see the module docstring)."""

    def __init__(self, trainer: Any, journal: Journal, iteration: Callable[[], int]) -> None:
        self.trainer = trainer
        self.journal = journal
        self.iteration = iteration
        self.rank0 = trainer.global_rank == 0
        self.present: dict[int, set[Key]] = {}
        self.originals: dict[int, Callable[..., Any]] = {}

    def install(self) -> None:
        for logger in self.trainer.loggers:
            if id(logger) in self.originals:
                continue
            self.originals[id(logger)] = logger.log_metrics

            def log_metrics(metrics: dict[str, Any], step: Optional[int] = None,
                            __logger: Any = logger) -> None:
                self.journal.row(self.iteration(), metrics, step)
                self._write(__logger, metrics, step, remember=False)

            logger.log_metrics = log_metrics

    def read_existing(self) -> None:
        """A replacement rank 0: learn what the previous rank 0 wrote."""
        for logger in self.trainer.loggers:
            rows = written(logger)
            if rows is not None:
                self.present[id(logger)] = rows

    def replay(self, rows: dict[int, list[tuple[dict[str, Any], Optional[int]]]]) -> int:
        """Write the peers' journaled rows that are not on disk yet; returns how many."""
        count = 0
        for iteration in sorted(rows):
            for metrics, step in rows[iteration]:
                for logger in self.trainer.loggers:
                    count += self._write(logger, metrics, step)
        return count

    def _write(self, logger: Any, metrics: dict[str, Any], step: Optional[int],
               remember: bool = True) -> int:
        """Rank 0 writes the values not on disk yet for ``step``; ``remember``: count them
        as on disk afterwards (rows written on a replacement's behalf, which its own run of
        the same iteration then does not repeat)."""
        if not self.rank0:
            return 0
        present = self.present.setdefault(id(logger), set())
        if step is None:
            fresh = dict(metrics)
        else:
            fresh = {k: v for k, v in metrics.items() if (int(step), k) not in present}
        if not fresh:
            return 0
        self.originals[id(logger)](fresh, step)
        logger.save()  # on disk now: a rank-0 failure loses no written row
        if step is not None and remember:
            present.update((int(step), k) for k in fresh)
        return 1
