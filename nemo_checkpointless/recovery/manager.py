"""In-process recovery: wraps the training loop, never lives inside it.

On a failure anywhere in the job, every healthy rank:

1. *detects* it (a collective fails, or the agent announces a new generation and the link
   thread aborts the communicators so the blocked collective fails at once);
2. *aborts* and forgets its process groups, keeping model, optimizer and data objects;
3. waits for the new generation and *rendezvous* with every rank of it (replacements too);
4. *rebuilds* the world and megatron's parallel state with the same arguments and rebinds
   every cached group handle;
5. agrees on the committed step (commit protocol), rolls forward if needed, and *streams*
   state to replacement ranks from their replica peers (no storage read);
6. re-gathers parameters, restores the RNG that starts the next step and trains on.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..comm.abort import (abort_communicators, forget_all_groups,
                          release_forgotten_groups_in_background)
from ..comm.rendezvous import GenerationChanged, RendezvousTimeout, rendezvous
from ..comm.store import JobIdentity, connect, parse_endpoints
from ..comm.init import report_store_ops
from ..comm.world import backend_for, default_timeout
from ..config import RunConfig
from ..heap import freeze
from ..launch.channel import Channel
from ..megatron import groups
from ..megatron import optimizer as mopt
from ..megatron.rebind import group_roles, rebind
from ..megatron.shards import (capture_rng, copy_main_to_model, optimizer_state_groups,
                               optimizer_state_tensors, restore_rng, shard_key)
from ..replication.replica_map import (RankInfo, UnrecoverableError, agree, donors_for,
                                       unprotected_ranks)
from ..replication.transfer import TransferError, exchange, nbytes
from ..train.hooks import HookList
from ..train.loop import StepDriver, Trainer
from .checkpoint import AsyncCheckpointer, complete_steps, load_part
from .commit import CommitProtocol
from .events import EventLog, read_events, summarize_recoveries
from .faults import FaultInjector, InjectedFault, parse_plan
from .interrupt import ComputeInterrupt
from .link import AgentLink

log = logging.getLogger(__name__)

_COMM_ERRORS = ("Connection closed", "Connection reset", "Broken pipe", "Socket Timeout",
                "Timed out", "gloo", "NCCL", "aborted", "Connection refused")


def abort_grace(backend: str) -> float:
    """Seconds between a generation notice and the abort of this rank's communicators
    (``NCL_ABORT_GRACE_S``): 1 s on gloo (see ``AgentLink``), none on NCCL, whose abort
    wakes every operation."""
    default = 1.0 if backend == "gloo" else 0.0
    return float(os.environ.get("NCL_ABORT_GRACE_S", default))


def _env_seconds(name: str, default: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(name, default)))


class RecoveryManager:
    """Runs a Trainer under checkpointless recovery on one rank started by ncl-launch.

    Timeouts (environment overrides): ``NCL_RECOVERY_TIMEOUT_S`` (default 300 s) bounds
    the wait for a new generation and for every rank to arrive at it; ``NCL_PG_TIMEOUT_S``
    (default 600 s) bounds every collective.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, channel: Channel,
                 lean_loop: bool = True) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.endpoints = parse_endpoints(os.environ["NCL_STORE_ENDPOINTS"])
        self.store = connect(self.endpoints, JobIdentity.from_env(),
                             _env_seconds("NCL_STORE_TIMEOUT_S", 60))
        self.recovery_timeout = _env_seconds("NCL_RECOVERY_TIMEOUT_S", 300)
        self.backend = backend_for(cfg.strategy.backend)
        self.link = AgentLink(channel, on_new_generation=self._abort_from_link,
                              abort_grace=abort_grace(self.backend)).start()
        # forward/backward stop at the next module on a failure notice. Default on gloo
        # (CPU compute runs on the training thread, uninterrupted by an abort); on NCCL the
        # abort fails the next collective and kernels are asynchronous (NCL_INTERRUPT=0/1)
        self.interrupt: Optional[ComputeInterrupt] = None
        if os.environ.get("NCL_INTERRUPT", "1" if self.backend == "gloo" else "0") == "1":
            self.interrupt = ComputeInterrupt(self.link.interrupt_pending)
        self.replacement = os.environ.get("NCL_REPLACEMENT", "0") == "1"
        self.gen = int(os.environ.get("NCL_GENERATION", "0"))
        self._spare_model: Optional[tuple[list[torch.nn.Module], dict[int, str]]] = None
        if os.environ.get("NCL_SPARE") == "1":
            if lean_loop:  # a driven (NeMo) job builds its own objects
                self._spare_model = self._prebuild_spare_model()
            self._wait_for_assignment()
        self.rank = int(os.environ["RANK"])
        self.faults = parse_plan(cfg.fault.plan, self.world_size, cfg.trainer.max_steps)
        self.commit = CommitProtocol()
        self.injector = FaultInjector(self.faults, self.rank, claim=self._claim_fault,
                                      on_fire=self._fault_fired)
        self.events = EventLog(self.run_dir / "events.jsonl", self.rank)
        # the step hooks a driver calls: commit barrier + RNG snapshots, fault injection
        self.step_hooks = HookList([self.commit, self.injector])
        self.trainer: Optional[StepDriver] = None
        self._prebuilt = False
        self._built_in_world = False  # attach(): the front-end built in the joined world
        self._joined_early: Optional[int] = None  # join_world(): generation joined already
        self.has_state = False
        self.old_roles: dict[int, str] = {}
        self.recovering: Optional[dict[str, Any]] = None
        if self.replacement:
            self.recovering = {"detected": time.time(), "from_gen": self.gen - 1}
        self.joined_gen = -1
        ck = cfg.checkpointless
        self.disk = ck.tier == "tier3" or ck.fallback == "disk"
        self.checkpoint_root = Path(ck.checkpoint_dir or self.run_dir / "checkpoints")
        self.checkpointer: Optional[AsyncCheckpointer] = None
        self._ops_mark: dict = {}
        self._cleaned_gen = 0
        groups.enable_local_group_sync()  # megatron's groups formed by their members only

    # ------------------------------------------------------------------ spares
    def _wait_for_assignment(self) -> None:
        """A warm spare: everything is imported; block until the agent hands us a rank."""
        msg = self.link.wait_assignment()
        os.environ.update(RANK=str(msg["rank"]), LOCAL_RANK=str(msg["local_rank"]))
        if msg.get("node_rank") is not None:  # a standby node's process takes a lost node's rank
            os.environ.update(NODE_RANK=str(msg["node_rank"]), GROUP_RANK=str(msg["node_rank"]))
        os.environ.pop("NCL_SPARE", None)
        self.gen = int(msg["gen"])
        self.replacement = True
        from ..train.entry import setup_logging

        setup_logging(int(msg["rank"]))
        log.warning("warm spare takes rank %d at generation %d", msg["rank"], self.gen)

    def _prebuild_spare_model(self) -> Optional[tuple[list[torch.nn.Module], dict[int, str]]]:
        """While idle, build the model chunks and DDP a replacement will need.

        Only where every rank has the same model (no TP/PP/CP split): built in a fake world
        of the job's size, weights zero-filled (peers overwrite them); the group handles
        are rebound to the real groups when the spare takes a rank (``_adopt_spare_model``).
        ``NCL_SPARE_PREBUILD=0`` turns it off. Any failure here only costs the head start.
        """
        from ..comm.world import fake_world
        from ..megatron import parallel
        from ..megatron.model import build_model_chunks

        cfg = self.cfg
        if (os.environ.get("NCL_SPARE_PREBUILD", "1") == "0"
                or not parallel.model_is_rank_independent(cfg.strategy)):
            return None
        t0 = time.perf_counter()
        try:
            torch.set_num_threads(cfg.trainer.num_threads)
            fake_world(self.world_size - 1, self.world_size)
            parallel.initialize(cfg.strategy, gloo_groups=False)
            chunks = build_model_chunks(cfg.model, cfg.strategy, cfg.data.seq_length,
                                        draw_weights=False)
            model = mopt.wrap_ddp(chunks, cfg.strategy)
            roles = group_roles()
        except Exception as err:  # noqa: BLE001 - the spare builds after assignment instead
            log.warning("warm spare could not prebuild its model (%s): it will build it when "
                        "it takes a rank", err)
            return None
        finally:
            forget_all_groups()
        log.info("warm spare: model and DDP built ahead in %.3fs", time.perf_counter() - t0)
        freeze("warm spare", collect=True)  # while idle: its set-up then walks no more
        return model, roles

    def _adopt_spare_model(self) -> Optional[list[torch.nn.Module]]:
        """The prebuilt chunks, rebound to this world's groups (None: build them now)."""
        from ..megatron.rebind import refresh_cached_ranks

        if self._spare_model is None:
            return None
        model, roles = self._spare_model
        self._spare_model = None
        try:
            rebind([model], roles)
            refresh_cached_ranks(model)
        except RuntimeError as err:
            log.warning("prebuilt model not usable (%s): building it now", err)
            return None
        return model

    # ------------------------------------------------------------------ faults
    def _claim_fault(self, index: int) -> bool:
        return int(self.store.add(f"fault/claim/{index}", 1)) == 1

    def _fault_fired(self, fault: Any) -> None:
        now = time.time()
        self.store.set(f"fault/at/{self.rank}", repr(now))
        self.events.write("fault", step=fault.step, phase=fault.phase, kind=fault.kind,
                          fault_rank=fault.rank)

    # ------------------------------------------------------------------ abort
    def _abort_from_link(self, gen: int) -> None:
        closed = abort_communicators(self.store.endpoints)
        log.warning("generation %d announced: aborted communicators (%d connections)", gen,
                    closed)

    def _recoverable(self, err: BaseException) -> bool:
        if isinstance(err, (InjectedFault, UnrecoverableError, TransferError)):
            return False
        if isinstance(err, (GenerationChanged, RendezvousTimeout)):
            return not isinstance(err, RendezvousTimeout)
        if self.link.superseded():
            return True
        if isinstance(err, getattr(dist, "DistError", ())):
            return True
        return isinstance(err, RuntimeError) and any(s in str(err) for s in _COMM_ERRORS)

    # ------------------------------------------------------------------ main loop
    def run(self, driver: Optional[StepDriver] = None) -> dict[str, Any]:
        """Train to max_steps through any number of recoveries; return the summary.

        ``driver``: one already built (in a world of fake groups before the job's world
        exists): its groups are forgotten here and rebound to the real ones when
        generation ``gen`` is joined. Without it, a lean :class:`Trainer` is built after the
        rendezvous.
        """
        if driver is not None:
            self._take_prebuilt(driver)
        first = True
        while True:
            try:
                if first:
                    first = False
                    self._enter(self.gen)
                elif self.recovering is not None:
                    self._recover()
                self._train()
                break
            except BaseException as err:  # noqa: BLE001 - classified right below
                self._on_failure(err)
        return self.finish()

    # ------------------------------------------------------------------ front-ends
    # A front-end whose framework owns the training loop (NeMo: Lightning's fit loop) calls
    # these instead of run(): join_world (a first start: the world before its objects),
    # attach (its built driver), recover (a failure it caught inside a step), step_done
    # (a step completed) and finish.

    def join_world(self) -> None:
        """Form the current generation's world now, before the front-end builds its
        objects in it (a first start). A replacement builds in a fake world instead and
        goes straight to :meth:`attach`."""
        self._join(self.gen)
        self._joined_early = self.gen

    def attach(self, driver: StepDriver) -> None:
        """Take over the front-end's built driver and settle the generation: rebuild and
        rebind groups if it was built in a fake world, agree on the committed step, stream
        state to this rank if it replaces one. Failures meanwhile are recovered from."""
        if self._joined_early == self.gen:
            self.trainer = driver
            self._built_in_world = True
        else:
            self._take_prebuilt(driver)
        first = True
        while True:
            try:
                if first:
                    first = False
                    self._enter(self.gen)
                else:
                    self._recover()
                return
            except BaseException as err:  # noqa: BLE001 - classified right below
                self._on_failure(err)

    def recover(self, err: BaseException) -> None:
        """A front-end caught ``err`` inside a step: re-raise it unless it is recoverable;
        else abort, join the next generation and settle it (again after any failure in
        the meantime). Returns with the driver at the agreed committed step."""
        self._on_failure(err)
        while True:
            try:
                self._recover()
                return
            except BaseException as again:  # noqa: BLE001 - classified right below
                self._on_failure(again)

    def step_done(self) -> None:
        """A step completed: closes the record of a recovery that preceded it."""
        if self.recovering is not None:
            self._first_step_done()

    def finish(self) -> dict[str, Any]:
        """The driver's summary, with the job's recoveries on rank 0 (summary.json)."""
        assert self.trainer is not None
        summary = self.trainer.finish()
        if self.rank == 0:
            summary["recoveries"] = summarize_recoveries(read_events(self.run_dir /
                                                                     "events.jsonl"))
            from ..metrics.writer import write_json
            write_json(self.run_dir / "summary.json", summary)
        return summary

    def _take_prebuilt(self, driver: StepDriver) -> None:
        """A driver built in a fake world: remember its groups' roles and forget them."""
        from megatron.core import parallel_state

        self.trainer = driver
        self._prebuilt = True
        if parallel_state.model_parallel_is_initialized():
            self.old_roles.update(group_roles())
        forget_all_groups()

    def _on_failure(self, err: BaseException) -> None:
        if not self._recoverable(err):
            raise err
        log.warning("failure detected: %s", str(err).splitlines()[0][:200] if str(err) else
                    type(err).__name__)
        if self.recovering is None:
            self.recovering = {"detected": time.time(), "from_gen": self.joined_gen}

    def _train(self) -> None:
        trainer = self.trainer
        assert trainer is not None
        while trainer.step < self.cfg.trainer.max_steps:
            trainer.train_step()
            if self.recovering is not None:
                self._first_step_done()

    # ------------------------------------------------------------------ recovery
    def _recover(self) -> None:
        rec = self.recovering
        assert rec is not None
        self.link.unwound()
        t0 = time.perf_counter()
        if self.trainer is not None:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                # accumulate: objects may still hold groups of an earlier, failed attempt
                self.old_roles.update(group_roles())
        abort_communicators(self.store.endpoints)
        forget_all_groups()
        rec.setdefault("phases", {})["abort"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        target = self.link.wait_newer(self.joined_gen, self.recovery_timeout.total_seconds())
        if target is None:
            raise UnrecoverableError(
                f"no new generation within {self.recovery_timeout.total_seconds():.0f}s "
                "(NCL_RECOVERY_TIMEOUT_S) after a failure: is the failed node's agent gone "
                "without a replacement?")
        rec["wait_generation"] = time.perf_counter() - t1
        self._enter(target)

    def _join(self, gen: int) -> float:
        """Rendezvous with every rank of generation ``gen`` (the world exists after it);
        returns the seconds the rendezvous took."""
        self.link.activate(gen)
        self.joined_gen = gen
        t0 = time.perf_counter()
        rendezvous(self.store, gen, self.rank, self.world_size, self.backend,
                   self.recovery_timeout, default_timeout(self.backend),
                   cancelled=self.link.superseded)
        seconds = time.perf_counter() - t0
        if self.rank == 0 and hasattr(self.store, "server_op_counts"):
            phase = "start-up" if gen == 0 else "recovery"
            _, self._ops_mark = report_store_ops(self.store, phase, self._ops_mark, gen)
            if gen > 0:  # nobody reads an older generation's keys again
                for old in range(max(0, self._cleaned_gen), gen):
                    self.store.delete_prefix(f"pg/{old}/")
                    self.store.delete_prefix(f"rdzv/{old}/")
                self._cleaned_gen = gen
        return seconds

    def _enter(self, gen: int) -> None:
        """Join generation ``gen``: world, parallel state, trainer objects, agreement."""
        rec = self.recovering
        t0 = time.perf_counter()
        if self._joined_early == gen:  # join_world() did it before the objects were built
            self._joined_early = None
            t1 = t0
        else:
            t1 = t0 + self._join(gen)
        built = self.trainer is None or self._prebuilt
        fresh_job = gen == 0 and not self.replacement
        if self.trainer is None:
            trainer = Trainer(self.cfg, self.run_dir, self.step_hooks)
            trainer.setup(collective=fresh_job, prebuilt=self._adopt_spare_model)
            self.trainer = trainer
            self._attach(fresh_job)
        elif self._prebuilt:
            self._prebuilt = False
            self._rebuild()
            self._attach(fresh_job)
        elif self._built_in_world:
            self._built_in_world = False
            self._attach(fresh_job)
        else:
            self._rebuild()
        if self.interrupt is not None:
            self.interrupt.install(self.trainer.model)
        t2 = time.perf_counter()
        transfer = self._reconcile()
        t3 = time.perf_counter()
        log.info("joined generation %d: rendezvous %.3fs, %s %.3fs, agreement+state %.3fs",
                 gen, t1 - t0, "skeleton" if built else "rebuild+rebind", t2 - t1,
                 t3 - t2)
        if rec is not None:
            phases = rec.setdefault("phases", {})
            phases["rendezvous"] = t1 - t0 + rec.get("wait_generation", 0.0)
            phases["group_rebuild"] = t2 - t1
            phases["state_transfer"] = t3 - t2
            rec["transfer"] = transfer
            rec["gen"] = gen
            rec["resumed_at"] = time.time()

    def _rebuild(self) -> None:
        """Rebuild megatron's parallel state on the new world and rebind cached groups."""
        assert self.trainer is not None
        t0 = time.perf_counter()
        self.trainer.rebuild_parallel()
        t1 = time.perf_counter()
        rebind(self.trainer.rebind_roots(), self.old_roles)
        self.old_roles = {}
        log.info("rebuild: parallel state %.3fs, rebind %.3fs", t1 - t0,
                 time.perf_counter() - t1)

    def _attach(self, fresh_job: bool) -> None:
        """First entry of a newly built driver: state flag, RNG, disk tier, preflight."""
        trainer = self.trainer
        assert trainer is not None
        self.has_state = fresh_job
        self.commit.rng_at[trainer.step + 1] = capture_rng()
        if self.disk:
            self.checkpointer = AsyncCheckpointer(
                self.checkpoint_root, self.rank, self.world_size,
                self.cfg.checkpointless.checkpoint_interval,
                tensors=lambda: optimizer_state_tensors(trainer.optimizer),
                blob=lambda step: self._state_blob(step),
                keep=self.cfg.checkpointless.checkpoint_keep)
            trainer.hooks.add(self.checkpointer)
            if fresh_job:
                self.checkpointer.save(0, wait=True)
        if fresh_job:
            self._preflight()

    def _rank_info(self) -> RankInfo:
        trainer = self.trainer
        assert trainer is not None and trainer.coords is not None
        tp, pp, shard = shard_key(self.cfg.strategy.use_distributed_optimizer)
        return RankInfo(rank=self.rank, has_state=self.has_state,
                        applied_step=trainer.step, entered_step=self.commit.entered_step,
                        passed_step=self.commit.passed_step, tp=tp, pp=pp, shard=shard)

    def _gather_infos(self) -> list[RankInfo]:
        mine = self._rank_info().to_tensor()
        out = torch.zeros(self.world_size * RankInfo.FIELDS, dtype=torch.int64)
        dist.all_gather_into_tensor(out, mine)
        return [RankInfo.from_tensor(row) for row in out.view(self.world_size, -1)]

    def _preflight(self) -> None:
        """Before training: say which ranks no peer can restore (no replica anywhere)."""
        if self.rank == 0:
            from ..plan import PlanError, preflight_report

            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            try:
                log.info("layout plan:\n%s", preflight_report(self.cfg, self.world_size,
                                                              per_node))
            except PlanError as err:  # the run-time check below still applies
                log.warning("layout planner: %s", err)
        infos = self._gather_infos()
        lonely = unprotected_ranks(infos)
        if lonely and self.rank == 0:
            s = self.cfg.strategy
            log.warning(
                "ranks %s hold optimizer shards with no replica: a failure of any of them "
                "cannot be recovered from peers. Set strategy."
                "num_distributed_optimizer_instances=2 (needs data-parallel x context-parallel "
                "size divisible by 2; now %d instance(s)) or checkpointless.fallback=disk.",
                lonely, s.num_distributed_optimizer_instances)
            self.events.write("preflight", unprotected_ranks=lonely)

    def _reconcile(self) -> dict[str, Any]:
        """Agree on the committed step, roll forward, stream state to replacements."""
        trainer = self.trainer
        assert trainer is not None
        marks = [time.perf_counter()]
        infos = self._gather_infos()
        lost = [i.rank for i in infos if not i.has_state]
        orphans = [r for r in lost if not donors_for(infos, r)]
        if self.cfg.checkpointless.tier == "tier3" and self.recovering is not None or (
                orphans and self.disk):
            return self._rollback_to_disk(orphans)
        agreement = agree(infos)
        if agreement.fresh_start:
            raise UnrecoverableError("every rank lost its state: nothing to recover from "
                                     "peers (checkpointless.fallback=disk restores from the "
                                     "latest checkpoint)")
        committed = agreement.committed_step
        if self.rank in agreement.roll_forward:
            log.warning("rolling step %d forward locally (its gradients were final)",
                        committed)
            trainer.commit()
            self.commit.rolled_forward(committed)
        plan: dict[int, list[int]] = {}
        for info in infos:
            if info.has_state:
                continue
            donors = donors_for(infos, info.rank)
            if not donors:
                raise UnrecoverableError(
                    f"rank {info.rank} lost optimizer shard (tp={info.tp}, pp={info.pp}, "
                    f"shard={info.shard}) and no healthy rank holds a replica. Set strategy."
                    "num_distributed_optimizer_instances=2 or checkpointless.fallback=disk.")
            plan[info.rank] = donors

        if self.recovering is not None:
            self.injector.fire("recovery", committed)
        if plan:
            dist.barrier()  # start together: the transfer time measures the transfer alone
        marks.append(time.perf_counter())
        received, stats = exchange(plan, self.rank, optimizer_state_groups(trainer.optimizer),
                                   lambda: self._state_blob(committed))
        if received is not None:
            self._adopt(received)
        trainer.pending = None
        marks.append(time.perf_counter())
        if plan or agreement.roll_forward or self.recovering is not None:
            mopt.gather_params(trainer.model, trainer.optimizer)
        marks.append(time.perf_counter())
        if plan or self.recovering is not None:
            log.info("agreement %.3fs, transfer %.3fs, parameter all-gather %.3fs",
                     *(b - a for a, b in zip(marks, marks[1:])))
        restore_rng(self.commit.rng_at[committed + 1])
        trainer.reset_step_marks()
        if self.rank == 0:
            self._ensure_metrics_row(committed)
        received_bytes = torch.tensor([stats.bytes_received], dtype=torch.int64)
        seconds = torch.tensor([stats.seconds], dtype=torch.float64)
        dist.all_reduce(received_bytes)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        raw = self._calibrate(plan) if plan and os.environ.get("NCL_TRANSFER_CALIBRATE") else None
        return {"bytes": int(received_bytes.item()), "seconds": float(seconds.item()),
                "raw_send_seconds": raw,
                "replacements": sorted(plan),
                "rolled_forward": list(agreement.roll_forward), "committed_step": committed}

    def _calibrate(self, plan: dict[int, list[int]]) -> float:
        """A raw gloo send of the same bytes between the same pair, right after the transfer
        and under the same load (benchmarks compare the two; off unless asked for)."""
        target, donors = min(plan.items())
        size = nbytes(optimizer_state_tensors(self.trainer.optimizer))  # type: ignore[union-attr]
        buf = torch.ones(size, dtype=torch.uint8)
        dist.barrier()
        t0 = time.perf_counter()
        if self.rank == donors[0]:
            dist.send(buf, target)
        elif self.rank == target:
            dist.recv(buf, donors[0])
        seconds = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        return float(seconds.item())

    def _state_blob(self, step: int) -> dict[str, Any]:
        """Everything but the optimizer shard that a rank needs to continue after ``step``."""
        trainer = self.trainer
        assert trainer is not None
        return {"step": trainer.step, "consumed_samples": trainer.consumed_samples,
                "scheduler_steps": trainer.schedule_state(),
                "rng": self.commit.rng_at[step + 1], "record": trainer.last_record}

    def _adopt(self, blob: dict[str, Any]) -> None:
        """Take over counters, schedule and RNG after the optimizer shard was filled in."""
        trainer = self.trainer
        assert trainer is not None
        step = blob["step"]
        trainer.step = step
        trainer.consumed_samples = blob["consumed_samples"]
        trainer.load_schedule_state(blob["scheduler_steps"])
        trainer.last_record = blob["record"]
        self.commit.rng_at = {step + 1: blob["rng"]}
        self.commit.entered_step = self.commit.passed_step = step
        copy_main_to_model(trainer.optimizer)
        self.has_state = True

    def _rollback_to_disk(self, orphans: list[int]) -> dict[str, Any]:
        """Every rank goes back to the latest complete disk checkpoint (tier 3 / fallback)."""
        trainer = self.trainer
        assert trainer is not None
        if orphans:
            log.warning("ranks %s lost shards that no live peer holds: rolling every rank "
                        "back to the latest disk checkpoint", orphans)
        if self.checkpointer is not None:
            self.checkpointer.wait()
        dist.barrier()  # every part being written has landed before anyone looks
        steps = complete_steps(self.checkpoint_root, self.world_size)
        latest = torch.tensor([steps[-1] if steps else -1], dtype=torch.int64)
        dist.all_reduce(latest, op=dist.ReduceOp.MIN)
        step = int(latest.item())
        if step < 0:
            raise UnrecoverableError(
                f"no complete checkpoint under {self.checkpoint_root} to fall back to")
        t0 = time.perf_counter()
        tensors = optimizer_state_tensors(trainer.optimizer)
        self._adopt(load_part(self.checkpoint_root, step, self.rank, tensors))
        seconds = time.perf_counter() - t0
        trainer.pending = None
        mopt.gather_params(trainer.model, trainer.optimizer)
        restore_rng(self.commit.rng_at[step + 1])
        trainer.reset_step_marks()
        if self.rank == 0 and trainer.metrics is not None:
            dropped = trainer.metrics.truncate_after(step)
            log.warning("rolled back to checkpoint step %d (%d metrics rows to redo)", step,
                        dropped)
        loaded = torch.tensor([nbytes(tensors)], dtype=torch.int64)
        dist.all_reduce(loaded)
        return {"bytes": int(loaded.item()), "seconds": seconds, "source": "disk",
                "checkpoint_step": step, "replacements": orphans, "committed_step": step}

    def _ensure_metrics_row(self, committed: int) -> None:
        trainer = self.trainer
        assert trainer is not None and trainer.metrics is not None
        path = self.run_dir / "metrics.jsonl"
        last = 0
        if path.exists():
            lines = [l for l in path.read_text().splitlines() if l.strip()]
            last = json.loads(lines[-1])["step"] if lines else 0
        record = trainer.last_record
        if last < committed and record is not None and record["step"] == committed:
            trainer.metrics.write(record)

    def _first_step_done(self) -> None:
        rec = self.recovering
        self.recovering = None
        # the new generation has stepped: the groups the failure aborted can go now
        release_forgotten_groups_in_background()
        if rec is None or self.rank != 0 or "gen" not in rec:
            return
        now = time.time()
        fault_at, detected_at = self._fault_times(rec.get("from_gen", 0), rec["gen"])
        start = fault_at or detected_at or rec["detected"]
        phases = dict(rec.get("phases", {}))
        if fault_at and detected_at:
            phases = {"detect": max(0.0, detected_at - fault_at), **phases}
        transfer = rec.get("transfer", {})
        phases["first_step"] = now - rec["resumed_at"]
        if transfer.get("source") == "disk" and "state_transfer" in phases:
            phases["checkpoint_load"] = phases.pop("state_transfer")
            first = phases.pop("first_step")
            phases["first_step"] = first
        for name, seconds in phases.items():
            extra: dict[str, Any] = {}
            if name == "checkpoint_load":
                extra = {"bytes": transfer.get("bytes", 0),
                         "checkpoint_step": transfer.get("checkpoint_step")}
            if name == "state_transfer":
                nbytes = transfer.get("bytes", 0)
                secs = transfer.get("seconds", 0.0)
                raw = transfer.get("raw_send_seconds")
                extra = {"bytes": nbytes, "mb_per_s": (nbytes / 1e6 / secs) if secs else None,
                         "raw_send_mb_per_s": (nbytes / 1e6 / raw) if raw else None,
                         "replacements": transfer.get("replacements", []),
                         "rolled_forward": transfer.get("rolled_forward", []),
                         "committed_step": transfer.get("committed_step")}
            if name == "first_step":
                extra = {"total_s": now - start, "step": self.trainer.step if self.trainer
                         else None}
            self.events.write("recovery_phase", generation=rec["gen"], phase=name,
                              duration_s=seconds, **extra)
        log.warning("recovered in %.2fs (generation %d)", now - start, rec["gen"])

    def _fault_times(self, from_gen: int, to_gen: int) -> tuple[Optional[float], Optional[float]]:
        faults, detects = [], []
        for g in range(max(from_gen, 0) + 1, to_gen + 1):
            try:
                record = json.loads(self.store.get(f"gen/{g}"))
            except Exception:
                continue
            if record.get("fault_at"):
                faults.append(float(record["fault_at"]))
            if record.get("detected_at"):
                detects.append(float(record["detected_at"]))
        return (min(faults) if faults else None, min(detects) if detects else None)
