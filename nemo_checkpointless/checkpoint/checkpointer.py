"""Durable checkpoints every N steps or M minutes: snapshot on the training thread,
write in the background, manifest last.

One :class:`DurableCheckpointer` per rank; every rank calls :meth:`maybe_save` after each
committed step with the same step number. What blocks the step (measured in
``last_stats["snapshot_s"]``):

* one 4-element all-reduce over the world per save (the *save agreement*: plan caches
  consistent on every rank, a save token from rank 0), plus one 1-element all-reduce per
  call when ``interval_minutes`` is set (all ranks must agree that the time is up);
* megatron's sharded state dicts, and the copy of this rank's share into reused host
  buffers (device to pinned host memory on a GPU);
* megatron's save planning (which also pickles the small objects: param groups, RNG):
  collective on the first two saves after a (re)start or :meth:`settle`, cached (no
  communication) from the third on.

Everything else (tensor serialisation, hashing, writing, syncing, the coordinator's
metadata and manifest, pruning) runs on a background thread, see ``writer.py``. At most
one save is in flight: a save first waits for the previous one (this rank's files; on
rank 0 also the manifest). The thread is a daemon: call :meth:`close` before the process
ends, or the save in flight is lost (it stays incomplete, never half-loaded).

A final save outside the schedule (preemption, end of a time limit): :meth:`save`, then
:meth:`wait`.
"""

from __future__ import annotations

import copy
import logging
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .. import device
from ..compat import megatron_checkpoint as mc
from . import manifest as mf
from . import snapshot as snap
from .writer import SaveJob

log = logging.getLogger(__name__)


class DurableCheckpointer:
    """Saves this rank's part of megatron-format checkpoints under ``root``.

    ``interval_steps``: save after every step divisible by it (None: no step schedule).
    ``interval_minutes``: also save when this long has passed since the last save (or
    the start); needs one scalar all-reduce per :meth:`maybe_save`. ``keep``: complete
    checkpoints kept (older ones are removed by rank 0 after a new one completes).
    ``finalize_timeout_s``: how long rank 0 waits for every rank's files before leaving a
    checkpoint incomplete.
    """

    def __init__(self, root: Path | str, *, interval_steps: Optional[int],
                 interval_minutes: Optional[float] = None, keep: int = 2,
                 finalize_timeout_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval_steps is not None and interval_steps < 1:
            raise ValueError(f"interval_steps={interval_steps}: a positive number of steps, "
                             "or None for no step schedule")
        if interval_minutes is not None and interval_minutes <= 0:
            raise ValueError(f"interval_minutes={interval_minutes}: positive, or None")
        if keep < 1:
            raise ValueError(f"keep={keep}: keep at least 1 checkpoint")
        self.root = Path(root)
        self.interval_steps = interval_steps
        self.interval_minutes = interval_minutes
        self.keep = keep
        self.finalize_timeout_s = finalize_timeout_s
        self._clock = clock
        self._last_save_clock = clock()
        self._last_step = -1
        self._snapshot = snap.HostSnapshot()
        self._strategy: Any = None
        self._strategy_group: Any = None
        self._saves_planned = 0
        self._job: Optional[SaveJob] = None
        self._thread: Optional[threading.Thread] = None
        self.last_stats: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []  # stats of finished saves (newest 100)

    # ------------------------------------------------------------------ schedule
    @property
    def last_saved_step(self) -> int:
        """The step of the newest save this process started (-1: none since a settle)."""
        return self._last_step

    def due(self, step: int) -> bool:
        """Whether ``step`` is a save step (the same answer on every rank)."""
        if step <= self._last_step:
            return False
        if self.interval_steps is not None and step % self.interval_steps == 0:
            return True
        if self.interval_minutes is None:
            return False
        late = self._clock() - self._last_save_clock >= 60.0 * self.interval_minutes
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return late
        flag = device.control_tensor([int(late)], torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank's clock is enough
        return bool(flag.item())

    def maybe_save(self, step: int, model: list[torch.nn.Module], optimizer: Any,
                   extra_state: dict[str, Any], rank_state: Any = None) -> bool:
        """Save after committed step ``step`` if it is due; True if a save started.

        ``extra_state``: the job's state that is the same on every rank, saved in the
        common part; it must hold ``consumed_samples`` and only dicts, lists, strings,
        numbers and tensors. ``rank_state``: any picklable object of this rank (the RNG
        snapshot that starts the next step), saved per rank.
        """
        if not self.due(step):
            return False
        self.save(step, model, optimizer, extra_state, rank_state)
        return True

    # ------------------------------------------------------------------ save
    def save(self, step: int, model: list[torch.nn.Module], optimizer: Any,
             extra_state: dict[str, Any], rank_state: Any = None) -> None:
        """Snapshot now, write in the background (collective: every rank calls it)."""
        from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

        if "consumed_samples" not in extra_state:
            raise KeyError("extra_state needs 'consumed_samples' (the data position the "
                           "manifest records)")
        snap.check_plain(extra_state)
        t0 = time.perf_counter()
        self.wait()
        t_wait = time.perf_counter() - t0
        rank, world = dist.get_rank(), dist.get_world_size()
        directory = mf.checkpoint_dir(self.root, step)
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if directory.exists():  # a re-save of this step (after a rollback): the old
                shutil.rmtree(directory)  # files and manifest go before anyone writes
        first, token = self._agree()
        t_agree = time.perf_counter()
        directory.mkdir(parents=True, exist_ok=True)
        layout = snap.current_layout(model)
        sd = snap.state_dict(model, optimizer, is_loading=False, rank_state=rank_state)
        sd[snap.COMMON_KEY] = {"step": int(step), "extra": extra_state}
        sd["iteration"] = int(step)
        sd["checkpoint_version"] = snap.CHECKPOINT_VERSION
        sd["content_metadata"] = dict(snap.SHARDING)
        sharded_part, common = save_preprocess(sd, validate_access_integrity=first)
        mc.distribute_main_replicas(self._strategy, sharded_part)
        t1 = time.perf_counter()
        nbytes = self._snapshot.take(sharded_part)
        t2 = time.perf_counter()
        planned = mc.plan(self._strategy, sharded_part, directory)
        t_plan = time.perf_counter()
        self._saves_planned += 1
        self._job = SaveJob(
            root=self.root, step=step, directory=directory, planned=planned, rank=rank,
            world_size=world, token=token,
            common=copy.deepcopy(common) if rank == 0 else None,
            manifest_fields={"consumed_samples": int(extra_state["consumed_samples"]),
                             "layout": layout,
                             "optimizer_format": snap.SHARDING["distrib_optim_sharding_type"]},
            keep=self.keep, timeout_s=self.finalize_timeout_s)
        self._thread = threading.Thread(target=self._job.run, name="ncl-durable-save",
                                        daemon=True)
        self._thread.start()
        self._last_step = step
        self._last_save_clock = self._clock()
        t3 = time.perf_counter()
        self.last_stats = {"step": step, "snapshot_s": t3 - t0, "wait_previous_s": t_wait,
                           "agree_s": t_agree - t0 - t_wait, "state_dict_s": t1 - t_agree,
                           "copy_s": t2 - t1, "plan_s": t_plan - t2, "snapshot_bytes": nbytes,
                           "planned_with_communication": first or self._saves_planned <= 2}
        self._job.stats.update(self.last_stats)

    def _agree(self) -> tuple[bool, int]:
        """The save agreement (one all-reduce): every rank plans the same way (a fresh
        strategy everywhere if any rank lacks the cache or holds stale groups), and the
        save gets rank 0's token. Returns (first save of the strategy, token)."""
        from megatron.core import parallel_state as ps

        group = ps.get_data_parallel_group(with_context_parallel=True)
        stale = (self._strategy is None or self._strategy_group is not group
                 or (self._saves_planned >= 2 and not mc.plan_is_cached(self._strategy)))
        token = secrets.randbits(62) if dist.get_rank() == 0 else 0
        count = self._saves_planned
        vec = device.control_tensor([count, -count, int(stale), token], torch.int64)
        dist.all_reduce(vec, op=dist.ReduceOp.MAX)
        most, least, any_stale, token = (int(v) for v in vec.tolist())
        if any_stale or most != -least:
            self._strategy = mc.planning_strategy(group)
            self._strategy_group = group
            self._saves_planned = 0
        return self._saves_planned == 0, token

    # ------------------------------------------------------------------ lifecycle
    def wait(self) -> Optional[dict[str, Any]]:
        """Wait for the save in flight: this rank's files (and on rank 0 the manifest).
        Returns its stats (``complete`` on rank 0; ``error`` if it failed) or None."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        job = self._job
        assert job is not None
        stats = dict(job.stats, complete=job.complete,
                     error=repr(job.error) if job.error else None)
        self.last_stats = stats
        self.history = [*self.history[-99:], stats]
        return stats

    def settle(self) -> bool:
        """After a recovery rebuilt the process groups, before anything looks for a
        checkpoint or saves again (collective: every rank of the new world, replacements
        too). The save in flight, if any, is completed when every rank of the old world
        had written its files (rank 0 must be the old rank 0), else left incomplete; plan
        caches, group handles and the schedule's memory of the last saved step are reset
        (a rollback may reach that step again). Returns True if the save in flight was
        completed here."""
        job = self._job
        self.abandon()
        dist.barrier()  # every live rank's files of the save in flight are on disk
        done = False
        if job is not None and dist.get_rank() == 0:
            try:
                done = job.finish_now()
            except Exception as err:  # noqa: BLE001 - leave it incomplete, say why
                log.error("could not complete the checkpoint of step %d after the "
                          "recovery: %r; it stays incomplete", job.step, err)
        self._job = None
        return done

    def abandon(self) -> None:
        """Local, no communication: stop waiting for other ranks' files (the checkpoint
        in flight stays incomplete unless every rank had reported already), wait for this
        rank's own writes, and forget plans, group handles and the last saved step."""
        if self._job is not None:
            self._job.cancel()
        self.wait()
        self._strategy = None
        self._strategy_group = None
        self._saves_planned = 0
        self._last_step = -1

    def close(self) -> Optional[dict[str, Any]]:
        """Finish the save in flight (end of job)."""
        return self.wait()
