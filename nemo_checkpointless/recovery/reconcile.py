"""Reconciliation after a generation is joined: agree, plan, transfer or disk, adopt.

Every rank reports a :class:`RankInfo` (has it state, which step it applied, entered and
passed the commit barrier of, which optimizer shard it holds). From the gathered infos,
:func:`plan_recovery` (pure logic) decides where the job continues from:

* ``peers``: the committed step is agreed (commit protocol), ranks that entered it roll
  forward locally, and each rank that lost its state receives its optimizer shard and its
  :class:`~nemo_checkpointless.state.RankState` from the healthy ranks holding a replica;
* ``disk``: every rank rolls back to the latest complete disk checkpoint (tier 3, or a
  lost shard no live peer holds, with ``fallback=disk``).

:class:`Reconciler` carries the plan out on one rank, with collectives over the world.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .. import device
from ..megatron import optimizer as mopt
from ..megatron.shards import shard_key
from ..replication.replica_map import (RankInfo, UnrecoverableError, agree, donors_for,
                                       unprotected_ranks)
from ..replication.transfer import exchange
from ..state import OptimizerShard, RankState
from ..steps import StepDriver
from .commit import CommitProtocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryPlan:
    """Where the job continues from, decided identically on every rank."""

    source: str  # "peers" or "disk"
    committed_step: int = 0  # peers: the agreed step (disk: decided by the checkpoints)
    roll_forward: tuple[int, ...] = ()
    transfers: dict[int, list[int]] = field(default_factory=dict)  # replacement -> donors
    orphans: tuple[int, ...] = ()  # lost ranks no live peer holds a replica of


def plan_recovery(infos: list[RankInfo], *, disk_source: bool, disk_fallback: bool,
                  recovering: bool) -> RecoveryPlan:
    """Decide from every rank's info (pure: the same on every rank).

    ``disk_source``: recoveries roll back to the disk checkpoint (tier 3).
    ``disk_fallback``: shards no live peer holds come from the disk checkpoint.
    ``recovering``: a failure happened (False when a job starts).
    """
    lost = [i.rank for i in infos if not i.has_state]
    orphans = tuple(r for r in lost if not donors_for(infos, r))
    if (disk_source and recovering) or (orphans and (disk_source or disk_fallback)):
        return RecoveryPlan("disk", orphans=orphans)
    agreement = agree(infos)
    if agreement.fresh_start:
        raise UnrecoverableError("every rank lost its state: nothing to recover from peers "
                                 "(checkpointless.fallback=disk restores from the latest "
                                 "checkpoint)")
    transfers: dict[int, list[int]] = {}
    for info in infos:
        if info.has_state:
            continue
        donors = donors_for(infos, info.rank)
        if not donors:
            raise UnrecoverableError(
                f"rank {info.rank} lost optimizer shard (tp={info.tp}, pp={info.pp}, "
                f"shard={info.shard}) and no healthy rank holds a replica. Set strategy."
                "num_distributed_optimizer_instances=2 or checkpointless.fallback=disk.")
        transfers[info.rank] = donors
    return RecoveryPlan("peers", agreement.committed_step, agreement.roll_forward, transfers)


def gather_infos(mine: RankInfo, world_size: int) -> list[RankInfo]:
    """Every rank's info, on every rank (one all-gather on the rank's device)."""
    out = device.zeros(world_size * RankInfo.FIELDS, torch.int64)
    dist.all_gather_into_tensor(out, mine.to_tensor(device.current()))
    return [RankInfo.from_tensor(row) for row in out.view(world_size, -1).cpu()]


class Reconciler:
    """Carries a :class:`RecoveryPlan` out on this rank.

    ``state``: the rank's :class:`RankState` (driver counters and commit protocol, moved
    beside the optimizer shard); ``disk``: where the disk checkpoints are, or None;
    ``on_recovery(step)``: called once the committed step is known during a recovery
    (fault injection's ``recovery`` phase); ``after_transfer(plan)``: an optional
    measurement run right after a transfer (the benchmarks' raw-send calibration).
    """

    def __init__(self, driver: StepDriver, commit: CommitProtocol, state: RankState, *,
                 rank: int, world_size: int, use_distributed_optimizer: bool,
                 disk: Optional["DiskSource"] = None, disk_source: bool = False,
                 on_recovery: Callable[[int], None] = lambda step: None,
                 after_transfer: Optional[Callable[[RecoveryPlan], Optional[float]]] = None
                 ) -> None:
        self.driver = driver
        self.commit = commit
        self.state = state
        self.rank = rank
        self.world_size = world_size
        self.use_distributed_optimizer = use_distributed_optimizer
        self.disk = disk
        self.disk_source = disk_source
        self.on_recovery = on_recovery
        self.after_transfer = after_transfer
        self.has_state = False

    @property
    def shard(self) -> OptimizerShard:
        return OptimizerShard(self.driver.optimizer)

    def info(self) -> RankInfo:
        tp, pp, shard = shard_key(self.use_distributed_optimizer)
        return RankInfo(rank=self.rank, has_state=self.has_state,
                        applied_step=self.driver.step, entered_step=self.commit.entered_step,
                        passed_step=self.commit.passed_step, tp=tp, pp=pp, shard=shard)

    def unprotected(self) -> list[int]:
        """Ranks whose optimizer shard has no replica anywhere (collective)."""
        return unprotected_ranks(gather_infos(self.info(), self.world_size))

    def run(self, recovering: bool) -> dict[str, Any]:
        """Make every rank's state consistent at one step; return what happened."""
        driver = self.driver
        marks = [time.perf_counter()]
        infos = gather_infos(self.info(), self.world_size)
        plan = plan_recovery(infos, disk_source=self.disk_source,
                             disk_fallback=self.disk is not None, recovering=recovering)
        if plan.source == "disk":
            return self._rollback_to_disk(plan)
        committed = plan.committed_step
        if self.rank in plan.roll_forward:
            log.warning("rolling step %d forward locally (its gradients were final)",
                        committed)
            driver.commit()
            self.commit.rolled_forward(committed)
        if recovering:
            self.on_recovery(committed)
        if plan.transfers:
            dist.barrier()  # start together: the transfer time measures the transfer alone
        marks.append(time.perf_counter())
        received, stats = exchange(plan.transfers, self.rank, self.shard.groups(),
                                   self.state.state_dict)
        if received is not None:
            self.adopt(received)
        driver.pending = None
        marks.append(time.perf_counter())
        if plan.transfers or plan.roll_forward or recovering:
            mopt.gather_params(driver.model, driver.optimizer)
        marks.append(time.perf_counter())
        if plan.transfers or recovering:
            log.info("agreement %.3fs, transfer %.3fs, parameter all-gather %.3fs",
                     *(b - a for a, b in zip(marks, marks[1:])))
        self.commit.restore_rng()
        driver.reset_step_marks()
        totals = device.control_tensor([stats.bytes_received], torch.int64)
        seconds = device.control_tensor([stats.seconds], torch.float64)
        dist.all_reduce(totals)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        raw = (self.after_transfer(plan) if plan.transfers and self.after_transfer is not None
               else None)
        return {"bytes": int(totals.item()), "seconds": float(seconds.item()),
                "raw_send_seconds": raw, "replacements": sorted(plan.transfers),
                "rolled_forward": list(plan.roll_forward), "committed_step": committed}

    def adopt(self, saved: dict[str, Any]) -> None:
        """Take over a peer's (or a checkpoint's) rank state once the shard is in place."""
        self.state.load_state_dict(saved)
        self.shard.publish()
        self.has_state = True

    def _rollback_to_disk(self, plan: RecoveryPlan) -> dict[str, Any]:
        """Every rank goes back to the newest verified durable checkpoint (collective)."""
        if self.disk is None:
            raise UnrecoverableError("checkpointless.recovery=disk but no durable checkpoints "
                                     "are configured (checkpoint.interval)")
        driver = self.driver
        if plan.orphans:
            log.warning("ranks %s lost shards that no live peer holds: rolling every rank "
                        "back to the latest durable checkpoint", list(plan.orphans))
        t0 = time.perf_counter()
        step, nbytes = self.disk.load(driver)
        self.commit.start_at(step)  # the RNG the checkpoint restored starts step + 1
        self.has_state = True
        seconds = time.perf_counter() - t0
        if self.rank == 0 and driver.metrics is not None:
            dropped = driver.metrics.truncate_after(step)
            log.warning("rolled back to checkpoint step %d (%d metrics rows to redo)", step,
                        dropped)
        driver.reset_step_marks()
        loaded = device.control_tensor([nbytes], torch.int64)
        dist.all_reduce(loaded)
        return {"bytes": int(loaded.item()), "seconds": seconds, "source": "disk",
                "checkpoint_step": step, "replacements": list(plan.orphans),
                "committed_step": step}


class DiskSource:
    """The durable checkpoints a rollback reads (``checkpoint/``): the newest one that
    verifies on every rank, loaded in place into the driver (collective)."""

    def __init__(self, checkpointer: Any, root: Path, verify: bool = True) -> None:
        self.checkpointer = checkpointer
        self.root = Path(root)
        self.verify = verify

    def load(self, driver: StepDriver) -> tuple[int, int]:
        """Roll ``driver`` (and this rank's RNG) back; return (step, bytes of this rank's
        optimizer shard)."""
        from ..checkpoint import latest_verified
        from ..checkpoint.driver import load_into
        from ..state import RngStreams

        self.checkpointer.wait()  # (settled by the generation loop before reconciling)
        info = latest_verified(self.root, verify_data=self.verify)
        if info is None:
            raise UnrecoverableError(
                f"no complete, verified checkpoint under {self.root} to fall back to")
        restored = load_into(info, driver, RngStreams())
        return restored.step, OptimizerShard(driver.optimizer).nbytes()
