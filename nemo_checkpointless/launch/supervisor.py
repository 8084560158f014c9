"""The node agent's supervisor: one node's ranks and warm spares for the life of the job.

It starts the node's ranks (``spawner.py``), serves its shard of the job store, reads every
rank's messages (``protocol.py``) and acts on them:

* a rank that exits is replaced by a warm spare (or a fresh process) and the job moves to
  a new generation; its local ranks are told (``Gen``). Healthy ranks are never restarted.
* a rank whose CUDA context is poisoned (``DeviceError`` / ``EXIT_DEVICE_ERROR``) is
  handed on only after its GPU passed a health probe (``gpu_health.py``); a GPU that fails
  makes the agent exit with ``EXIT_NODE_UNHEALTHY`` so that the node is replaced.
* hangs are judged by progress (``progress.py``, acted on in ``hangs.py``): a stopped rank
  is killed and replaced; ranks that wait with their process alive get their communicators
  aborted (a new generation) and are killed only if they do not unwind.
* a rank that says the job cannot recover (``Fatal``, ``EXIT_UNRECOVERABLE``), or one that
  fails without recovery or before its start-up went through, stops the job; so does a rank
  whose processes die ``--max-start-failures`` times in a row before completing a step
  (``start_failures.py``). A stop with ``EXIT_UNRECOVERABLE`` is announced to every agent,
  which stop too (``ending.py``: every way an agent ends).
* other nodes are watched through their store servers (``peers.py``): a node that stays
  unreachable is declared lost at once.

A replacement node is a new agent with the same ``--node-rank``: it finds the job started,
starts its ranks as replacements and bumps the generation. Standby nodes: ``standby.py``.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
from typing import Any, Optional

from .. import allocator
from ..comm.store import JobIdentity, StoreServer, connect, parse_endpoints
from . import ending, gpu_health, hangs, protocol
from .environment import child_base_env
from .generations import bump_generation, current_generation, fault_time, read_record
from .limits import AgentLimits
from .peers import PeerWatch
from .spawner import Child, ChildSpec, Spawner, kill_all
from .start_failures import StartFailures

log = logging.getLogger("ncl.agent")

# how long a rank that sent Fatal may take to exit before the agent stops the job anyway
FATAL_EXIT_GRACE_S = 10.0


class NodeAgent:
    """Supervises one node's ranks and spares for the life of the job."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.timeouts = args.timeouts
        self.node_rank: Optional[int] = args.node_rank
        self.nproc = args.nproc_per_node
        self.world_size = args.nnodes * args.nproc_per_node
        self.peers = parse_endpoints(args.peers)
        self.identity = JobIdentity(args.job_id, args.job_secret)
        self.server: Optional[StoreServer] = None
        self.store: Any = None
        self.quick_store: Any = None
        self.gen = 0
        self.ranks: dict[int, Child] = {}
        self.spares: list[Child] = []
        self.selector = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.stopping = False
        self.stop_signal: Optional[str] = None  # set by the signal handler
        self.stop_requested = False  # SIGTERM/SIGUSR1 passed on: stop after a checkpoint
        self.stopped = False  # a rank stopped so (exit code 143): so does this agent
        self.job_stopped: Optional[dict[str, Any]] = None  # another agent stopped the job
        limits = getattr(args, "limits", None) or AgentLimits()
        self.start_failures = StartFailures(limits.max_start_failures)
        self.replacement = False
        self.refill_at: Optional[float] = None
        self.peer_watch: Optional[PeerWatch] = None
        self.gpu = not allocator.rehearsal_host(os.environ)
        try:  # CPU rehearsal preloads tcmalloc/jemalloc into every child (allocator.py)
            allocator_env = allocator.worker_env()
        except allocator.AllocatorError as err:
            raise SystemExit(f"ncl-launch: {err}") from None
        preloaded = allocator_env.get("LD_PRELOAD", "").split()
        log.info("workers' host allocator: %s", preloaded[0] if preloaded else "glibc malloc")
        self.base_env = child_base_env(os.environ, self.identity.env(), self.identity.job_id,
                                       self.timeouts, self.gpu, allocator_env)
        if self.timeouts.hang_initial(self.gpu) < self.timeouts.recovery_s:
            log.warning("--hang-initial-timeout (%gs) is shorter than --recovery-timeout (%gs): "
                        "ranks waiting for a replacement node may be taken for hung",
                        self.timeouts.hang_initial(self.gpu), self.timeouts.recovery_s)
        self.spawner = Spawner(args.script, args.script_args, self.base_env,
                               fork=args.spawn == "fork", timeouts=self.timeouts,
                               gpu=self.gpu, on_spawn=self._register)

    @property
    def owner_id(self) -> str:
        kind = "standby" if self.args.standby else "agent"
        return f"{kind}:{socket.gethostname()}:{os.getpid()}"

    # ------------------------------------------------------------------ start
    def connect_store(self) -> None:
        self.store = connect(self.peers, self.identity, self.timeouts.delta("store_s"),
                             lookups=self.args.standby_lookups)
        # best-effort reads on the recovery path (fault times): never the full store timeout
        self.quick_store = self.store.clone()
        self.quick_store.set_timeout(datetime.timedelta(seconds=0.5))

    def start(self) -> None:
        if self.node_rank < len(self.peers):
            host, port = self.peers[self.node_rank]
            self.server = StoreServer.for_address(host, port, self.identity).start()
            log.info("node %d serves the job store at %s:%d", self.node_rank, host, port)
        self.connect_store()
        # where the other shards are served now (the peer list may predate a replacement
        # or a standby's takeover), then this node's own address, on every server
        self.store.refresh_endpoints(skip=self.node_rank)
        if self.server is not None:  # a replacement node may live on another host
            self.store.publish_endpoint(self.node_rank, self.peers[self.node_rank])
        self.peers = list(self.store.endpoints)
        started_key = f"node/{self.node_rank}/started"
        self.replacement = bool(self.store.check([started_key]))
        owner_key = f"node/{self.node_rank}/owner"
        if self.replacement and self.store.check([owner_key]):
            owner = self.store.get(owner_key).decode()
            if owner.startswith("standby:"):
                raise SystemExit(
                    f"ncl-launch: node {self.node_rank} was taken over by a standby node "
                    f"({owner}) and is running; start this agent with --standby instead, to "
                    "be the job's next spare node")
        self.store.set(started_key, str(os.getpid()))
        self.store.set(owner_key, self.owner_id)
        self.gen = current_generation(self.store)
        if self.replacement:
            ranks = self.local_rank_ids()
            self.gen = bump_generation(self.store, {
                "reason": f"node {self.node_rank} replaced", "node": self.node_rank,
                "ranks": ranks, "detected_at": time.time(),
                "fault_at": fault_time(self.quick_store, ranks)})
            log.warning("node %d rejoins the job as a replacement at generation %d",
                        self.node_rank, self.gen)
        for local_rank, rank in enumerate(self.local_rank_ids()):
            self.ranks[rank] = self.spawn(rank, local_rank, replacement=self.replacement)
        for _ in range(self.args.spares):
            self.spares.append(self.spawn(None, None, replacement=True))
        self.start_watchers()

    def start_watchers(self) -> None:
        threading.Thread(target=self._watch_generations, name="ncl-generations",
                         daemon=True).start()
        self.peer_watch = PeerWatch(self.store, lambda: self.node_rank, self.nproc,
                                    self.timeouts.node_lost_after_s, self.owner_id,
                                    lambda: self.stopping).start()

    def local_rank_ids(self) -> list[int]:
        base = self.node_rank * self.nproc
        return list(range(base, base + self.nproc))

    def spawn(self, rank: Optional[int], local_rank: Optional[int], replacement: bool) -> Child:
        child = self.spawner.spawn(ChildSpec(
            rank=rank, local_rank=local_rank, replacement=replacement, gen=self.gen,
            node_rank=self.node_rank, world_size=self.world_size, nproc=self.nproc,
            endpoints=self.store.endpoints))  # where every server lives now
        if local_rank is not None:
            self._bind(child, local_rank)
        return child

    def _bind(self, child: Child, local_rank: int) -> None:
        """``--cpu-bind numa``: pin a rank (a spare once assigned) to its NUMA node."""
        if getattr(self.args, "cpu_bind", "none") != "numa":
            return
        from .numa import bind_rank

        try:
            log.info(bind_rank(child.proc.pid, local_rank, self.nproc, self.gpu))
        except OSError as err:  # the process may be gone already: its exit is handled
            log.warning("could not bind local rank %d: %s", local_rank, err)

    def _register(self, child: Child) -> None:
        self.selector.register(child.channel.sock, selectors.EVENT_READ, child)

    # ------------------------------------------------------------------ generations
    def _watch_generations(self) -> None:
        """Tell local ranks about every new generation (set by any agent)."""
        while not self.stopping:
            nxt = self.gen + 1
            try:
                self.store.wait([f"gen/{nxt}"], datetime.timedelta(seconds=0.5))
            except Exception:  # noqa: BLE001 - timeout or a store hiccup: look again
                continue
            self._fence(nxt)
            if ending.stopped_elsewhere(self, nxt):
                return
            with self.lock:
                if nxt > self.gen:
                    self.gen = nxt
                now = time.monotonic()
                for child in list(self.ranks.values()):
                    child.watch.new_generation(now)
                    child.channel.send(protocol.Gen(gen=self.gen))

    def _fence(self, gen: int) -> None:
        """A standby took this node over (it could not reach us): our ranks are no longer
        the job's, so stop them at once instead of competing with the new owners."""
        record = read_record(self.store, gen) or {}
        owner = record.get("taken_over_by")
        if owner and record.get("node") == self.node_rank and owner != self.owner_id:
            log.error("node %d was taken over by %s at generation %d: stopping this node's "
                      "ranks", self.node_rank, owner, gen)
            self.stopping = True
            kill_all([*self.ranks.values(), *self.spares])
            os._exit(1)

    # ------------------------------------------------------------------ supervise
    def run(self) -> int:
        """Supervise until every local rank finished; return the exit code."""
        if self.args.standby:
            from .standby import listen, wait_for_lost_node

            server = listen(self)  # before the zygote: a taken port fails in a second
            self.spawner.start_zygote()
            if not wait_for_lost_node(self, server):
                ending.stop_spares(self)  # the job ended without needing this standby
                return int(self.job_stopped.get("exit_code") or protocol.EXIT_UNRECOVERABLE) \
                    if self.job_stopped is not None else 0
        else:
            self.spawner.start_zygote()
            self.start()
        while True:
            # A rank that dies closes its channel first, which wakes this loop at once; its
            # exit code follows a moment later, so look every poll_interval while one is
            # pending and every idle_poll_interval otherwise (heartbeats wake the loop too).
            exiting = any(c.hung_up and not c.finished for c in self.ranks.values())
            poll = self.args.poll_interval if exiting else self.args.idle_poll_interval
            for key, _ in self.selector.select(timeout=poll):
                self._read(key)
            with self.lock:
                if self.job_stopped is not None:
                    return ending.follow_job_stop(self)
                self._ask_ranks_to_stop()
                code = self._check_ranks()
                if code is not None:
                    return code
                self.spares = [s for s in self.spares if s.proc.poll() is None]
                if self.refill_at is not None and time.monotonic() >= self.refill_at:
                    self.refill_at = None
                    while len(self.spares) < self.args.spares:
                        self.spares.append(self.spawn(None, None, replacement=True))
            if all(c.finished for c in self.ranks.values()):
                code = ending.finish(self)
                return protocol.EXIT_STOPPED if self.stopped and code == 0 else code

    def _read(self, key: selectors.SelectorKey) -> None:
        child: Child = key.data
        messages = child.channel.receive(timeout=0)
        if messages is None:
            self.selector.unregister(key.fileobj)
            child.hung_up = True
            return
        child.take(messages, time.monotonic())

    def _check_ranks(self) -> Optional[int]:
        """Act on exits and hangs of the node's ranks (lock held); an exit code ends the
        agent."""
        acted = False
        for rank, child in list(self.ranks.items()):
            if child.finished:
                continue
            code = child.proc.poll()
            if code is not None and not child.hung_up:
                self._drain(child)  # its last messages (a Step, a Fatal) before judging
            if code == 0:
                child.finished = True
                child.watch.stop()
            elif code is not None and (child.stopped or code == protocol.EXIT_STOPPED):
                # the job was asked to stop (here or on another node) and checkpointed
                child.finished = True
                child.watch.stop()
                self.stopped = True
            elif code is not None and (child.done or self._job_finished()):
                # every rank was past the job's last collective: its result stands
                log.warning("rank %d exited with code %d after the job finished: not "
                            "replaced", rank, code)
                child.finished = True
                child.watch.stop()
            elif code is not None and (child.fatal is not None or not child.recovery
                                       or not child.hello
                                       or code == protocol.EXIT_UNRECOVERABLE):
                return ending.stop_job(self, rank, child, code)
            elif code is not None and (code == protocol.EXIT_DEVICE_ERROR
                                       or child.device_error is not None):
                escalate = self._probe_device(rank, child, code) or self.replace(
                    rank, child, f"device error ({child.device_error or code}); its GPU "
                                 "passed the health probe")
                if escalate is not None:
                    return escalate
                acted = True
            elif code is not None:
                escalate = self.replace(rank, child, f"exit code {code}")
                if escalate is not None:
                    return escalate
                acted = True
            elif child.fatal is not None and \
                    time.monotonic() - child.fatal_at > FATAL_EXIT_GRACE_S:
                return ending.stop_job(self, rank, child, None)
        if not acted:  # judge hangs only when this loop did not block on other work
            return hangs.judge_hangs(self)
        return None

    def _drain(self, child: Child) -> None:
        """Read what an exited rank sent before its channel closed."""
        while not child.hung_up:
            messages = child.channel.receive(timeout=0)
            if messages is None:
                try:
                    self.selector.unregister(child.channel.sock)
                except (KeyError, ValueError):
                    pass
                child.hung_up = True
            elif not messages:
                return
            else:
                child.take(messages, time.monotonic())

    def _job_finished(self) -> bool:
        """Rank 0 marks the job finished once every rank passed its final barrier."""
        try:
            return bool(self.quick_store.check(["job/finished"]))
        except Exception:  # noqa: BLE001 - unknown: treat the exit as a failure
            return False

    def _probe_device(self, rank: int, child: Child, code: int) -> Optional[int]:
        """Probe the GPU of a rank that left it with a device error; an exit code when the
        GPU failed and this node must be replaced."""
        device = child.local_rank or 0
        result = gpu_health.probe(device, self.args.gpu_probe, self.timeouts.gpu_probe_s,
                                  self.gpu, env=self.base_env)
        if result.skipped:
            log.info("rank %d left with a device error (exit code %d): %s", rank, code,
                     result.detail)
            return None
        if result.ok:
            log.warning("GPU %d passed its health probe in %.1fs after rank %d's device "
                        "error: %s", device, result.seconds, rank, result.detail)
            return None
        log.error("GPU %d failed its health probe after rank %d's device error (%s): %s. "
                  "No more work goes to this node: stopping it (exit code %d) so that the "
                  "scheduler or a standby node replaces it", device, rank,
                  child.device_error or f"exit code {code}", result.detail,
                  protocol.EXIT_NODE_UNHEALTHY)
        return ending.unhealthy_node(self, device)

    def replace(self, rank: int, dead: Child, reason: str) -> Optional[int]:
        """Hand a dead rank to a spare or a fresh process, in a new generation; an exit
        code instead when its processes keep dying before their first step."""
        detected = time.time()
        stepped = dead.steps > 0 or not dead.progress
        if self.start_failures.record(rank, dead.proc.pid, reason, stepped):
            return ending.end_job(self, rank, self.start_failures.message(rank),
                                  protocol.EXIT_UNRECOVERABLE)
        count = self.start_failures.count(rank)
        log.error("rank %d failed (%s): replacing it%s", rank, reason,
                  f" ({count} of --max-start-failures {self.start_failures.limit} in a row "
                  "before a step)" if count and self.start_failures.limit else "")
        try:
            self.selector.unregister(dead.channel.sock)
        except (KeyError, ValueError):
            pass
        dead.channel.close()
        self.gen = bump_generation(self.store, {
            "reason": reason, "node": self.node_rank, "ranks": [rank],
            "detected_at": detected, "fault_at": fault_time(self.quick_store, [rank])})
        local_rank = dead.local_rank
        now = time.monotonic()
        if self.spares:
            spare = self.spares.pop(0)
            self.assign(spare, rank, local_rank, None, now)
            # refill later: a spare's imports would compete with the recovery for CPU
            self.refill_at = now + self.timeouts.spare_refill_delay_s
        else:
            self.ranks[rank] = self.spawn(rank, local_rank, replacement=True)
            if self.stop_requested:
                self.ranks[rank].channel.send(protocol.Stop(reason="the job is stopping"))
        for child in self.ranks.values():
            if child.rank != rank:
                child.watch.new_generation(now)
                child.channel.send(protocol.Gen(gen=self.gen))
        return None

    def assign(self, spare: Child, rank: int, local_rank: Optional[int],
               node_rank: Optional[int], now: float) -> None:
        """Hand ``rank`` to a warm spare."""
        spare.rank, spare.local_rank = rank, local_rank
        spare.watch.expect_first(now)
        spare.channel.send(protocol.Assign(rank=rank, local_rank=local_rank or 0,
                                           gen=self.gen, node_rank=node_rank))
        if self.stop_requested:
            spare.channel.send(protocol.Stop(reason="the job is stopping"))
        self.ranks[rank] = spare
        log.info("warm spare pid %d takes rank %d at generation %d", spare.proc.pid, rank,
                 self.gen)
        if local_rank is not None:
            self._bind(spare, local_rank)

    def request_stop(self, signum: int, *_: Any) -> None:
        """Signal handler for SIGTERM or SIGUSR1 (a scheduler's stop, a time limit): the job
        finishes the step every rank agrees on, writes a durable checkpoint of it and
        stops; this agent then exits ``EXIT_STOPPED`` (143). Asking again changes nothing.
        The handler only records the request; the supervision loop acts on it."""
        if self.stop_signal is None:
            self.stop_signal = signal.Signals(signum).name
        if self.args.standby and self.node_rank is None:  # no node of its own: nothing to save
            log.warning("%s: this standby holds no node; exiting", self.stop_signal)
            kill_all(self.spares)
            os._exit(protocol.EXIT_STOPPED)

    def _ask_ranks_to_stop(self) -> None:
        """Tell every rank of this node, once, that the job is asked to stop (lock held)."""
        if self.stop_requested or self.stop_signal is None:
            return
        self.stop_requested = True
        log.warning("%s: asking this node's ranks to stop after the next step every rank "
                    "agrees on, with a checkpoint", self.stop_signal)
        for child in self.ranks.values():
            child.channel.send(protocol.Stop(reason=self.stop_signal))

    def shutdown(self, *_: Any) -> None:
        self.stopping = True
        kill_all([*self.ranks.values(), *self.spares])
        sys.exit(1)
