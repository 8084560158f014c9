"""Where the job meets after a recovery, and how a replacement catches up with its peers.

After every recovery (and at a first attach) each rank of the new world reports where it
stands in Lightning's loop: its kind (a survivor, a replacement, a fresh start) and the
position (iteration, index) of the recovery point it was at. The job meets at the
furthest survivor's point. A replacement gets a package from a survivor standing there
(the peer's :class:`~.journal.Journal` entries for that iteration, the loggers' versions,
a stop every rank agreed on) and restores Lightning's state from the start of the meeting's
iteration, its data after the committed step, and the logger rows rank 0 lost; it then
re-runs the iteration's hooks, skipping the points before the meeting one. A survivor
that fell one point behind where a collective with a result completed elsewhere cannot
learn that result: it leaves, to be replaced (barriers and saves simply count as done).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Optional

import torch

from .. import device
from ..compat import collectives, lightning_fit

if TYPE_CHECKING:
    from ..recovery.generation import RecoveryLoop
    from .driver import NemoStepDriver
    from .journal import Journal
    from .loggers import LoggerGuard
    from .stop import StopRequest

log = logging.getLogger("nemo_checkpointless.nemo.session")

Position = tuple[int, int]
FRESH, SURVIVOR, NEW = 0, 1, 2  # what a rank reports at a meeting
EXIT_BEHIND = 1  # the agent replaces a rank that exits non-zero


class Meeting:
    """The meeting and the catch-up of :class:`~.session.CheckpointlessSession` (a mixin)."""

    loop: Optional["RecoveryLoop"]
    trainer: Any
    driver: Optional["NemoStepDriver"]
    loggers: Optional["LoggerGuard"]
    journal: "Journal"
    stop: "StopRequest"
    new: bool
    catch_up: Optional[Position]
    rank: int
    _resultless: bool
    _behind_done: bool
    _pending_metrics: Optional[dict[str, Any]]
    _init_global_step: Optional[int]

    def _meet(self, pos: Optional[Position]) -> None:
        """Every rank of the new world reports where it stands; the job meets at the
        furthest survivor's point; a replacement gets what it needs to catch up."""
        from megatron.core import parallel_state as ps

        world = torch.distributed.get_world_size()
        kind = NEW if self.new else (SURVIVOR if pos is not None and pos[0] >= 0 else FRESH)
        step, index = pos if pos is not None else (0, 0)
        mine = device.control_tensor([kind, step, index, int(self._resultless),
                                      int(ps.is_pipeline_last_stage())], torch.int64)
        table = device.zeros(world * 5, torch.int64)
        collectives.original("all_gather_into_tensor")(table, mine)
        rows = table.view(world, 5).tolist()
        survivors = [(r, (row[1], row[2]), row[4]) for r, row in enumerate(rows)
                     if row[0] == SURVIVOR]
        newcomers = any(row[0] == NEW for row in rows)
        if not survivors:  # the job is at its start: agree on the loggers' versions
            versions = [lightning_fit.logger_versions(self.trainer)]
            collectives.original("broadcast_object_list")(versions, src=0)
            lightning_fit.set_logger_versions(self.trainer, versions[0])
            return
        meeting = max(p for _, p, _ in survivors)
        if newcomers:
            at_meeting = [(not last, r) for r, p, last in survivors if p == meeting]
            src = min(at_meeting)[1]  # prefer the last pipeline stage: it logs the loss
            box = [self._package(meeting) if self.rank == src else None]
            collectives.original("broadcast_object_list")(box, src=src)
            if kind == NEW:
                self._load(box[0], meeting)
        if kind == SURVIVOR and (step, index) < meeting:
            if self._resultless:
                self._behind_done = True  # it completed elsewhere; nothing to learn from it
            else:
                self._leave(meeting)
        log.info("recovery point: step %d, point %d%s", meeting[0], meeting[1],
                 " (a replacement catches up)" if newcomers else "")

    def _leave(self, meeting: Position) -> None:
        log.error("this rank missed the result of a collective its peers completed (they "
                  "are at step %d, point %d): leaving so that a replacement takes its place",
                  *meeting)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_BEHIND)

    def _package(self, meeting: Position) -> dict[str, Any]:
        package = self.journal.package(meeting[0])
        package["versions"] = lightning_fit.logger_versions(self.trainer)
        package["stop_after"] = self.stop.step
        return package

    def _load(self, package: dict[str, Any], meeting: Position) -> None:
        """A replacement: stand where Lightning stood at the start of the meeting's
        iteration, data after the committed step, and write the rows rank 0 lost."""
        trainer, driver = self.trainer, self.driver
        assert driver is not None and self.loggers is not None
        self.catch_up = meeting
        self.journal.adopt(package, meeting[0])
        self.stop.agreed(package.get("stop_after"))
        snapshot = package.get("snapshot")
        if snapshot is not None:
            lightning_fit.restore(trainer, snapshot)
            self._pending_metrics = snapshot["callback_metrics"]
        lightning_fit.set_logger_versions(trainer, package["versions"])
        sampler = trainer.strategy.data_sampler
        sampler.init_consumed_samples = driver.consumed_samples
        sampler.prev_consumed_samples = driver.consumed_samples
        sampler.if_first_step = 1
        self._init_global_step = driver.step
        if trainer.global_rank == 0:
            self.loggers.read_existing()
            rows = self.loggers.replay(package.get("rows", {}))
            if rows:
                log.warning("wrote %d logger rows the previous rank 0 had not", rows)
        log.warning("replacement: catching up with the job at step %d, point %d "
                    "(committed step %d)", meeting[0], meeting[1], driver.step)
