"""A job's edges around the generation loop: a built driver wired to checkpoints and peers.

The generation loop (``generation.py``) hands every newly built step driver here once:
its state contract, the durable checkpointer and its save hook, the disk source, and the
:class:`~.reconcile.Reconciler` that settles each generation. The job's first generation
resumes from the newest verified checkpoint (a new job of a chain) and runs the preflight;
a stop request writes a final checkpoint; rank 0 keeps ``metrics.jsonl`` one row per
committed step across replacements.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

from ..checkpoint.config import directory as checkpoint_directory
from ..checkpoint.config import make_checkpointer
from ..checkpoint.driver import CheckpointHook, resume
from ..config import RunConfig
from ..metrics.events import EventLog
from ..replication.replica_map import UnrecoverableError
from ..state import OptimizerShard, RankState, RngStreams
from ..steps import StepDriver
from .commit import CommitProtocol
from .faults import FaultInjector
from .reconcile import DiskSource, Reconciler

log = logging.getLogger(__name__)


class JobEdges:
    """One rank's durable checkpoints and reconciler, and what a job does at its edges."""

    def __init__(self, cfg: RunConfig, run_dir: Path, *, rank: int, world_size: int,
                 commit: CommitProtocol, injector: FaultInjector, events: EventLog,
                 after_transfer: Optional[Callable[..., Optional[float]]] = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.world_size = world_size
        self.commit = commit
        self.injector = injector
        self.events = events
        self.after_transfer = after_transfer
        ck = cfg.checkpointless
        self.disk_source = ck.recovery == "disk"
        self.disk = self.disk_source or ck.fallback == "disk"
        self.checkpoint_root = checkpoint_directory(cfg.checkpoint, self.run_dir)
        self.durable: Optional[Any] = None  # checkpoint.DurableCheckpointer, once attached

    def attach(self, driver: StepDriver) -> Reconciler:
        """First entry of a newly built driver: its state, durable checkpoints, and the
        reconciler that settles every generation from now on."""
        self.commit.start_at(driver.step)
        state = RankState({"driver": driver, "commit": self.commit,
                           "optimizer": OptimizerShard(driver.optimizer)})
        if self.durable is None:
            self.durable = make_checkpointer(self.cfg.checkpoint, self.run_dir,
                                             under_agent=True)
        if self.durable is not None:
            driver.hooks.add(CheckpointHook(
                self.durable, driver, RngStreams(),
                on_save=lambda step: self.injector.fire("checkpoint", step)))
        disk = None
        if self.disk:
            if self.durable is None:
                raise UnrecoverableError(
                    "recovery from disk needs durable checkpoints: set checkpoint.interval")
            disk = DiskSource(self.durable, self.checkpoint_root,
                              verify=self.cfg.checkpoint.verify)
        return Reconciler(
            driver, self.commit, state, rank=self.rank, world_size=self.world_size,
            use_distributed_optimizer=self.cfg.strategy.use_distributed_optimizer,
            disk=disk, disk_source=self.disk_source,
            on_recovery=lambda step: self.injector.fire("recovery", step),
            after_transfer=self.after_transfer)

    def begin(self, driver: StepDriver, reconciler: Reconciler) -> None:
        """Every rank built fresh: resume from the newest verified durable checkpoint (a
        new job of a chain), else start at step 0; then the preflight (collective)."""
        ck = self.cfg.checkpoint
        resumed = None
        if ck.resume == "auto":  # the RNG too, unless the data-parallel size changed
            resumed = resume(driver, self.checkpoint_root, RngStreams(), verify_data=ck.verify)
            self.commit.start_at(driver.step)
        if resumed is None and self.disk and self.durable is not None:
            # something to roll back to before the first scheduled save
            CheckpointHook(self.durable, driver, RngStreams()).save_now()
        reconciler.has_state = True
        self._preflight(reconciler)

    def save_for_stop(self, driver: StepDriver) -> None:
        """A stop every rank agreed on: the final durable checkpoint of this step (a driver
        whose framework writes its own, ``writes_stop_checkpoint``, needs none)."""
        if self.durable is not None:
            CheckpointHook(self.durable, driver, RngStreams()).save_now()
        elif not getattr(driver, "writes_stop_checkpoint", False):
            log.warning("stopping after step %d without a checkpoint (checkpoint.interval=0):"
                        " a new job starts from its last one", driver.step)

    def ensure_metrics_row(self, driver: StepDriver, committed: int) -> None:
        """Rank 0 writes the committed step's row if its metrics file lacks it (rank 0 was
        replaced, or rolled the step forward from a peer's record)."""
        assert driver.metrics is not None
        path = self.run_dir / "metrics.jsonl"
        last = 0
        if path.exists():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            last = json.loads(lines[-1])["step"] if lines else 0
        record = driver.last_record
        if last < committed and record is not None and record["step"] == committed:
            driver.metrics.write(record)

    def _preflight(self, reconciler: Reconciler) -> None:
        """Before training: say which ranks no peer can restore (no replica anywhere)."""
        if self.rank == 0:
            from ..plan import PlanError, preflight_report

            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            try:
                log.info("layout plan:\n%s", preflight_report(self.cfg, self.world_size,
                                                              per_node))
            except PlanError as err:  # the run-time check below still applies
                log.warning("layout planner: %s", err)
        lonely = reconciler.unprotected()
        if lonely and self.rank == 0:
            s = self.cfg.strategy
            log.warning(
                "ranks %s hold optimizer shards with no replica: a failure of any of them "
                "cannot be recovered from peers. Set strategy."
                "num_distributed_optimizer_instances=2 (needs data-parallel x context-parallel "
                "size divisible by 2; now %d instance(s)) or checkpointless.fallback=disk.",
                lonely, s.num_distributed_optimizer_instances)
            self.events.write("preflight", unprotected_ranks=lonely)
