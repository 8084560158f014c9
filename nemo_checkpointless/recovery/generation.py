"""The generation loop: train, and on a failure re-form the job and continue, in process.

On a failure anywhere in the job, every healthy rank:

1. *detects* it (a collective fails, or the agent announces a new generation and the link
   thread aborts the communicators so the blocked collective fails at once) and classifies
   it (``failures.py``: recoverable, or fatal);
2. *aborts* and forgets its process groups, keeping model, optimizer and data objects;
3. waits for the new generation and *rendezvous* with every rank of it (replacements too);
4. *rebuilds* the world and megatron's parallel state with the same arguments and rebinds
   every cached group handle;
5. *reconciles* (``reconcile.py``): agrees on the committed step, rolls forward if needed,
   and streams state to replacement ranks from their replica peers (or rolls back to disk);
6. restores the RNG that starts the next step and trains on.

The loop knows no front-end: it drives a :class:`~nemo_checkpointless.steps.StepDriver`
built by a :class:`~nemo_checkpointless.steps.FrontEnd` (or handed over already built);
a job's edges are in ``job.py``, the entry points of a loop a framework owns in ``owned.py``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .. import device
from ..comm.abort import (abort_communicators, forget_all_groups,
                          release_forgotten_groups_in_background)
from ..comm.init import report_store_ops
from ..comm.rendezvous import rendezvous
from ..comm.store import JobIdentity, connect, parse_endpoints
from ..comm.world import backend_for
from ..compat.megatron_versions import forget_collective_caches
from ..config import RunConfig
from ..gpu.health import poisons_context
from ..megatron import groups
from ..megatron.rebind import current_roles, rebind
from ..metrics.events import EventLog, read_events, summarize_recoveries
from ..metrics.progress import Progress
from ..metrics.timeline import RecoveryTimeline
from ..replication.replica_map import UnrecoverableError
from ..steps import FrontEnd, HookList, StepDriver, Stopped
from ..timeouts import Timeouts
from .commit import CommitProtocol
from .failures import Fatal, Verdict, classify
from .faults import FaultInjector, parse_plan
from .interrupt import ComputeInterrupt
from .link import AgentLink, ReportProgress
from .owned import OwnedLoopEntries
from .job import JobEdges
from .reconcile import Reconciler
from .spares import WarmSpare

log = logging.getLogger(__name__)


class RecoveryLoop(OwnedLoopEntries):
    """Runs one rank started by ncl-launch to ``max_steps`` through any number of failures.

    ``interrupt``: stop forward/backward at the next module when a failure is announced.
    ``progress(lead)``: the progress reporter, once this process knows its rank.
    ``after_transfer``: optional measurement right after a state transfer (benchmarks).
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, channel: Any,
                 front_end: Optional[FrontEnd], timeouts: Timeouts, *,
                 interrupt: bool, progress: Callable[[bool], Progress],
                 after_transfer: Optional[Callable[..., Optional[float]]] = None) -> None:
        from ..logs import setup_logging

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.front_end = front_end
        self.timeouts = timeouts
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.store = connect(parse_endpoints(os.environ["NCL_STORE_ENDPOINTS"]),
                             JobIdentity.from_env(), timeouts.delta("store_s"))
        self.backend = backend_for(cfg.strategy.backend)
        self.link = AgentLink(channel, on_new_generation=self._abort_from_link,
                              abort_grace=timeouts.abort_grace(self.backend)).start()
        self.interrupt = ComputeInterrupt(self.link.interrupt_pending) if interrupt else None
        self.replacement = os.environ.get("NCL_REPLACEMENT", "0") == "1"
        self.gen = int(os.environ.get("NCL_GENERATION", "0"))
        self.spare: Optional[WarmSpare] = None
        if os.environ.get("NCL_SPARE") == "1":
            # only in CPU rehearsal: a spare does not know its GPU before it is assigned
            build = (front_end.spare_model if front_end is not None and self.backend == "gloo"
                     and cfg.checkpointless.spare_prebuild else None)
            self.spare = WarmSpare(self.world_size, build)
            msg = WarmSpare.wait_for_assignment(self.link)
            self.gen, self.replacement = int(msg["gen"]), True
            setup_logging(int(msg["rank"]))
            log.warning("warm spare takes rank %d at generation %d", msg["rank"], self.gen)
        self.rank = int(os.environ["RANK"])
        self.progress = progress(self.rank == 0)
        self.faults = parse_plan(cfg.fault.plan, self.world_size, cfg.trainer.max_steps)
        self.commit = CommitProtocol(stop_requested=lambda: self.link.stop_requested)
        self.injector = FaultInjector(self.faults, self.rank, claim=self._claim_fault,
                                      on_fire=self._fault_fired)
        self.events = EventLog(self.run_dir / "events.jsonl", self.rank)
        # which process holds which rank from which generation on (benchmarks read it)
        self.events.write("rank_process", pid=os.getpid(), host=socket.gethostname(),
                          generation=self.gen, replacement=self.replacement)
        self.step_hooks = HookList([self.commit, self.injector, ReportProgress(self.link)])
        self.driver: Optional[StepDriver] = None
        self.reconciler: Optional[Reconciler] = None
        self._prebuilt = False
        self._built_in_world = False  # attach(): the front-end built in the joined world
        self._joined_early: Optional[int] = None  # join(): the generation joined already
        self.fresh_start = False  # the last generation joined started the job afresh
        self.old_roles: dict[int, str] = {}
        self.timeline: Optional[RecoveryTimeline] = None
        if self.replacement:
            self.timeline = RecoveryTimeline(from_gen=self.gen - 1)
        self.joined_gen = -1
        self.edges = JobEdges(cfg, self.run_dir, rank=self.rank, world_size=self.world_size,
                              commit=self.commit, injector=self.injector, events=self.events,
                              after_transfer=after_transfer)
        self.summary: Optional[dict[str, Any]] = None
        self._ops_mark: dict = {}
        self._cleaned_gen = 0
        self._joiner = threading.get_ident()
        groups.enable_local_group_sync()  # megatron's groups formed by their members only

    # ------------------------------------------------------------------ faults
    def _claim_fault(self, index: int) -> bool:
        return int(self.store.add(f"fault/claim/{index}", 1)) == 1

    def _fault_fired(self, fault: Any) -> None:
        self.store.set(f"fault/at/{self.rank}", repr(time.time()))
        self.events.write("fault", step=fault.step, phase=fault.phase, kind=fault.kind,
                          fault_rank=fault.rank)

    # ------------------------------------------------------------------ abort
    def _abort_from_link(self, gen: int) -> None:
        closed = abort_communicators(self.store.endpoints)
        # a world still forming (gloo's address exchange, a rendezvous barrier passed
        # just before another rank left it) waits in the store, which no abort reaches
        woken = self.link.while_stale(gen, lambda: self.store.interrupt(self._joiner))
        log.warning("generation %d announced: aborted communicators (%d connections%s)",
                    gen, closed, f", {woken} store waits interrupted" if woken else "")

    def _verdict(self, err: BaseException) -> Verdict:
        return classify(err, superseded=self.link.superseded,
                        confirmed_within=lambda s: self.link.wait_newer(self.joined_gen, s)
                        is not None,
                        confirm_timeout=self.timeouts.failure_confirm_s)

    # ------------------------------------------------------------------ main loop
    def run(self, driver: Optional[StepDriver] = None) -> dict[str, Any]:
        """Train to max_steps through any number of recoveries; return the summary.

        ``driver``: one already built in a world of fake groups before the job's world
        existed: its groups are forgotten here and rebound to the real ones when
        generation ``gen`` is joined. Without it, the front-end builds one after the
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
                elif self.timeline is not None:
                    self._recover()
                self._train()
                return self._finish()
            except BaseException as err:  # noqa: BLE001 - classified right below
                self._on_failure(err)

    def _take_prebuilt(self, driver: StepDriver) -> None:
        """A driver built in a world of fake groups: remember its groups' roles (rebound to
        the real groups on joining) and forget the fake ones."""
        self.driver = driver
        self._prebuilt = True
        self.old_roles.update(current_roles())
        forget_all_groups()

    def _on_failure(self, err: BaseException) -> None:
        """Re-raise ``err`` unless it is recoverable; open the recovery's record."""
        if poisons_context(err):  # a sticky CUDA error: this process is done
            self.link.exit_device_error(str(err).splitlines()[0][:500])
        if self._verdict(err) is Verdict.FATAL:
            raise err
        log.warning("failure detected: %s", str(err).splitlines()[0][:200] if str(err)
                    else type(err).__name__)
        if self.timeline is None:
            self.timeline = RecoveryTimeline(from_gen=self.joined_gen)

    def _finish(self) -> dict[str, Any]:
        """The job's end, inside the recoverable region: the last durable save lands, the
        state hash (collective) and summary.json. A failure here recovers like one in a
        step, and the end is redone."""
        driver = self.driver
        assert driver is not None
        if self.timeline is not None:  # a failure in the last step: its recovery ends here
            self._first_step_done()
        self.link.pause("finish")  # no more steps: the initial timeout covers the end
        self.injector.fire("finish", driver.step)
        durable = self.edges.durable
        if durable is not None:
            durable.wait()
        summary = driver.finish()
        if self.rank == 0:
            summary["recoveries"] = summarize_recoveries(read_events(self.run_dir /
                                                                     "events.jsonl"))
            from ..metrics.writer import write_json
            write_json(self.run_dir / "summary.json", summary)
        dist.barrier()  # every rank is past the last collective: the job is done
        if self.rank == 0:  # agents do not replace a rank that dies from here on
            self.store.set("job/finished", "1")
        if durable is not None:
            durable.close()
        self.summary = summary
        return summary

    @property
    def after_transfer(self) -> Optional[Callable[..., Optional[float]]]:
        """The measurement run right after a state transfer (set before the driver is built)."""
        return self.edges.after_transfer

    @after_transfer.setter
    def after_transfer(self, measure: Optional[Callable[..., Optional[float]]]) -> None:
        self.edges.after_transfer = measure

    @property
    def stop_after(self) -> Optional[int]:
        """The step every rank agreed (at its commit barrier) to stop after, if any."""
        return self.commit.stop_after

    def _train(self) -> None:
        driver = self.driver
        assert driver is not None
        while driver.step < self.cfg.trainer.max_steps:
            metrics = driver.train_step()
            if self.timeline is not None:
                self._first_step_done()
            self.progress.on_step(metrics)
            if self.commit.stop_after is not None and driver.step >= self.commit.stop_after:
                self._stop()

    def _stop(self) -> None:
        """Every rank agreed (at the commit barrier) to stop after this step: write a
        durable checkpoint of it and leave (a new job resumes from it)."""
        driver = self.driver
        assert driver is not None
        self.link.pause("stop")
        self.edges.save_for_stop(driver)
        dist.barrier()  # every rank's files and rank 0's manifest are written
        if self.rank == 0:
            log.warning("stopped after step %d as asked; a new job with the same run "
                        "directory resumes from its checkpoint", driver.step)
        raise Stopped(driver.step)

    # ------------------------------------------------------------------ recovery
    def _recover(self) -> None:
        timeline = self.timeline
        assert timeline is not None
        self.link.unwound()
        t0 = time.perf_counter()
        if self.driver is not None:
            # accumulate: objects may still hold groups of an earlier, failed attempt
            self.old_roles.update(current_roles())
        abort_communicators(self.store.endpoints)
        forget_all_groups()
        if self._built_in_world:  # built in the world just aborted: rebound on joining
            self._built_in_world, self._prebuilt = False, True
        timeline.mark("abort", time.perf_counter() - t0)
        t1 = time.perf_counter()
        wait = self.timeouts.recovery_s
        target = self.link.wait_newer(self.joined_gen, wait)
        if target is None:
            raise UnrecoverableError(
                f"no new generation within {wait:.0f}s (NCL_RECOVERY_TIMEOUT_S) after a "
                "failure: is the failed node's agent gone without a replacement?")
        timeline.wait_generation = time.perf_counter() - t1
        self._enter(target)

    def _join(self, gen: int) -> float:
        """Rendezvous with every rank of generation ``gen`` (the world exists after it);
        returns the seconds it took."""
        self._joiner = threading.get_ident()  # the thread whose store waits abort wakes
        self.link.activate(gen)
        self.joined_gen = gen
        t0 = time.perf_counter()
        rendezvous(self.store, gen, self.rank, self.world_size, self.backend,
                   self.timeouts.delta("recovery_s"), self.timeouts.pg(self.backend),
                   cancelled=self.link.superseded)
        seconds = time.perf_counter() - t0
        self._tidy_store(gen)
        return seconds

    def _enter(self, gen: int) -> None:
        """Join generation ``gen``: world, parallel state, driver objects, agreement."""
        t0 = time.perf_counter()
        if self._joined_early == gen:  # join() formed it before the front-end built
            self._joined_early = None
            t1 = t0
        else:
            t1 = t0 + self._join(gen)
        # a fresh start: no rank of this world holds training state yet (the job's first
        # generation, or a failure hit every rank before any finished its set-up)
        fresh = not self._anyone_has_state()
        self.fresh_start = fresh
        self.commit.stop_after = None  # re-agreed at the next barrier (the request stays)
        if fresh and self.driver is not None and not self._prebuilt and \
                not self._built_in_world:
            if self.front_end is None:  # its framework built it: nothing here rebuilds it
                raise Fatal("a failure hit every rank before any finished its set-up; the "
                            "front-end's set-up is not recovered in process: start the job "
                            "again")
            self.driver = None  # half-built by a failed start: build again, with the rest
            self.reconciler = None
        if fresh:
            self.injector.fire("startup", 1)
        built = self.driver is None or self._prebuilt or self._built_in_world
        if self.driver is None:
            assert self.front_end is not None
            # a warm spare's prebuilt model has zero-filled weights for peers to fill: in
            # a fresh start there are no peers with state, so everyone draws them
            prebuilt = self.spare.take_model if self.spare is not None and not fresh else None
            self.driver = self.front_end.build(self.step_hooks, collective=fresh,
                                               prebuilt=prebuilt)
            self._attach()
        elif self._prebuilt:
            self._prebuilt = False
            self._rebuild()
            self._attach()
        elif self._built_in_world:  # attach() after join(): built in this very world
            self._built_in_world = False
            self._attach()
        else:
            self._rebuild()
        if self.interrupt is not None:
            self.interrupt.install(self.driver.model)
        assert self.reconciler is not None
        if fresh:
            self.edges.begin(self.driver, self.reconciler)
        elif self.edges.durable is not None:
            self.edges.durable.settle()  # the save a failure interrupted: completed or dropped
        t2 = time.perf_counter()
        transfer = self.reconciler.run(recovering=self.timeline is not None)
        if self.rank == 0:
            self.edges.ensure_metrics_row(self.driver, transfer["committed_step"])
        t3 = time.perf_counter()
        log.info("joined generation %d: rendezvous %.3fs, %s %.3fs, agreement+state %.3fs",
                 gen, t1 - t0, "skeleton" if built else "rebuild+rebind", t2 - t1, t3 - t2)
        if self.timeline is not None:
            self.timeline.joined(gen, t1 - t0, t2 - t1, t3 - t2, transfer)

    def _tidy_store(self, gen: int) -> None:
        """Rank 0: report the store traffic and drop older generations' keys."""
        if self.rank != 0 or not hasattr(self.store, "server_op_counts"):
            return
        _, self._ops_mark = report_store_ops(self.store, "start-up" if gen == 0 else
                                             "recovery", self._ops_mark, gen)
        if gen > 0:  # nobody reads an older generation's keys again
            for old in range(max(0, self._cleaned_gen), gen):
                self.store.delete_prefix(f"pg/{old}/")
                self.store.delete_prefix(f"rdzv/{old}/")
            self._cleaned_gen = gen

    def _rebuild(self) -> None:
        """Rebuild megatron's parallel state on the new world and rebind cached groups."""
        assert self.driver is not None
        t0 = time.perf_counter()
        self.driver.rebuild_parallel()
        t1 = time.perf_counter()
        rebind(self.driver.rebind_roots(), self.old_roles)
        self.old_roles = {}
        # megatron-core 0.19 caches a collective's answer in the optimizer: a replacement
        # starts without it, so every rank forgets it and asks again, together
        forget_collective_caches(self.driver.optimizer)
        log.info("rebuild: parallel state %.3fs, rebind %.3fs", t1 - t0,
                 time.perf_counter() - t1)

    def _anyone_has_state(self) -> bool:
        """Whether any rank of the new world holds training state (one all-reduce)."""
        mine = self.reconciler is not None and self.reconciler.has_state
        flag = device.control_tensor([int(mine)], torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _attach(self) -> None:
        """First entry of a newly built driver: wired to checkpoints and the reconciler."""
        assert self.driver is not None
        self.reconciler = self.edges.attach(self.driver)

    def _first_step_done(self) -> None:
        timeline, self.timeline = self.timeline, None
        # the new generation has stepped: the groups the failure aborted can go now
        release_forgotten_groups_in_background()
        if timeline is not None:
            timeline.finish(self.events, self.store,
                            self.driver.step if self.driver is not None else None,
                            lead=self.rank == 0)
