"""``ncl-launch``: the node agent. torchrun-compatible flags, warm spares, no restarts.

One agent per node starts the node's ranks, serves a share of the job's store, watches
its ranks (process exit at once, a stalled heartbeat after ``--hang-timeout``), and on a
failure hands the dead rank's id to a warm spare (or a fresh process), bumps the job's
generation in the store and tells its local ranks. Healthy ranks are never restarted.

    ncl-launch --nnodes 2 --nproc-per-node 2 --node-rank 0 \\
        --peers host0:29400,host1:29400 --spares 1 recipes/pretrain.py checkpointless=tier4

A replacement node is simply a new agent started with the same ``--node-rank``: it finds
the job already started, starts its ranks as replacements and bumps the generation.

A *standby node* (``--standby``) is an agent with no node rank of its own: it starts
``--nproc-per-node`` warm processes (imported, waiting) and watches every agent's store
server. When one stays unreachable for ``--lost-after`` seconds, the standby claims that
node rank (one claim per node and generation wins), serves the node's store shard from
its own address, bumps the generation and hands the lost node's ranks to its warm
processes: a whole node comes back as fast as one rank, without waiting for the scheduler.

Ranks and spares are forked from a *zygote* (``--spawn fork``, the default; zygote.py): one
process per agent that imported torch, megatron-core and hydra once, at the agent's start.
A new rank or spare then costs a fork and the script's own set-up, not ~3 CPU-seconds of
imports competing with training. ``--spawn exec`` starts each one as ``python -u script``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .. import allocator
from ..comm import wire
from ..comm.store import (JobIdentity, StoreServer, connect, format_endpoints,
                          parse_endpoints)
from ..comm.world import free_port
from .channel import ENV_FD, Channel
from .zygote import Zygote, ZygoteError

log = logging.getLogger("ncl.agent")

EXIT_UNRECOVERABLE = 3  # a rank's verdict that the job cannot recover (train/entry.py)


@dataclass
class Child:
    """A rank or spare process of this node."""

    proc: Any  # subprocess.Popen, or zygote.ForkedProcess (the same calls)
    channel: Channel
    rank: Optional[int] = None
    local_rank: Optional[int] = None
    recovery: bool = True
    heartbeat_seen: bool = False
    hello: bool = False  # the rank reported its recovery mode: start-up went through
    done: bool = False  # training finished: teardown may block, no hang checks
    last_heartbeat: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)
    finished: bool = False
    hung_up: bool = False  # its channel closed: it is exiting, watch for the exit code


def bump_generation(store: Any, record: dict[str, Any]) -> int:
    """Move the job to a new generation; the record says why (read by ranks for events)."""
    gen = int(store.add("gen", 1))
    store.set(f"gen/{gen}", json.dumps(dict(record, gen=gen)))
    return gen


def current_generation(store: Any) -> int:
    return int(store.add("gen", 0))


class NodeAgent:
    """Supervises one node's ranks and spares for the life of the job."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.node_rank: Optional[int] = args.node_rank
        self.nproc = args.nproc_per_node
        self.world_size = args.nnodes * args.nproc_per_node
        self.peers = parse_endpoints(args.peers)
        self.identity = JobIdentity(args.job_id, args.job_secret)
        self.server: Optional[StoreServer] = None
        self.store: Any = None
        self.gen = 0
        self.ranks: dict[int, Child] = {}
        self.spares: list[Child] = []
        self.selector = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.stopping = False
        self.replacement = False
        self.refill_at: Optional[float] = None
        self.zygote: Optional[Zygote] = None
        self.zygote_checked = False
        self.fork = args.spawn == "fork"  # False once the zygote failed: exec from then on
        try:  # CPU rehearsal preloads tcmalloc/jemalloc into every child (allocator.py)
            self.allocator_env = allocator.worker_env()
        except allocator.AllocatorError as err:
            raise SystemExit(f"ncl-launch: {err}") from None
        preloaded = self.allocator_env.get("LD_PRELOAD", "").split()
        log.info("workers' host allocator: %s", preloaded[0] if preloaded else "glibc malloc")

    @property
    def owner_id(self) -> str:
        kind = "standby" if self.args.standby else "agent"
        return f"{kind}:{socket.gethostname()}:{os.getpid()}"

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        if self.node_rank < len(self.peers):
            host, port = self.peers[self.node_rank]
            bind = "0.0.0.0" if host not in ("127.0.0.1", "localhost") else host
            self.server = StoreServer(bind, port, self.identity).start()
            log.info("node %d serves the job store at %s:%d", self.node_rank, host, port)
        timeout = datetime.timedelta(seconds=self.args.store_timeout)
        self.store = connect(self.peers, self.identity, timeout)
        if self.server is not None:  # a replacement node may live on another host
            self.store.publish_endpoint(self.node_rank, self.peers[self.node_rank])
        self.peers = self.store.refresh_endpoints()
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
            self.gen = bump_generation(self.store, {
                "reason": f"node {self.node_rank} replaced", "node": self.node_rank,
                "ranks": self.local_rank_ids(), "detected_at": time.time(),
                "fault_at": self._fault_time(self.local_rank_ids())})
            log.warning("node %d rejoins the job as a replacement at generation %d",
                        self.node_rank, self.gen)
        for local_rank, rank in enumerate(self.local_rank_ids()):
            self.ranks[rank] = self._spawn(rank, local_rank, replacement=self.replacement)
        for _ in range(self.args.spares):
            self.spares.append(self._spawn(None, None, replacement=True))
        threading.Thread(target=self._watch_generations, daemon=True).start()

    def local_rank_ids(self) -> list[int]:
        base = self.node_rank * self.nproc
        return list(range(base, base + self.nproc))

    def _base_env(self) -> dict[str, str]:
        """What every child's environment has, store aside (the zygote starts with it: it
        holds what is read at import time, such as OMP_NUM_THREADS)."""
        env = dict(os.environ)
        env.update(self.identity.env())
        env.setdefault("NCL_RUN_ID", self.identity.job_id)
        env.update(
            OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
            TORCH_CPP_LOG_LEVEL=env.get("TORCH_CPP_LOG_LEVEL", "ERROR"),
            PYTHONUNBUFFERED="1",
        )
        env.update(self.allocator_env)
        return env

    def _env(self, rank: Optional[int], local_rank: Optional[int], replacement: bool,
             child_fd: int) -> dict[str, str]:
        env = self._base_env()
        peers = self.store.endpoints  # where every server lives now (replaced nodes moved)
        master_host, master_port = peers[0]
        env.update(
            WORLD_SIZE=str(self.world_size),
            LOCAL_WORLD_SIZE=str(self.nproc),
            GROUP_RANK=str(self.node_rank if self.node_rank is not None else -1),
            NODE_RANK=str(self.node_rank if self.node_rank is not None else -1),
            MASTER_ADDR=master_host,
            MASTER_PORT=str(master_port),
            NCL_STORE_ENDPOINTS=format_endpoints(peers),
            NCL_GENERATION=str(self.gen),
            NCL_REPLACEMENT="1" if replacement else "0",
            NCL_HANG_TIMEOUT_S=str(self.args.hang_timeout),
        )
        env[ENV_FD] = str(child_fd)
        if rank is None:
            env["NCL_SPARE"] = "1"
            for key in ("RANK", "LOCAL_RANK"):
                env.pop(key, None)
        else:
            env.pop("NCL_SPARE", None)
            env.update(RANK=str(rank), LOCAL_RANK=str(local_rank))
        return env

    def _spawn(self, rank: Optional[int], local_rank: Optional[int], replacement: bool) -> Child:
        channel, child_sock = Channel.pair()
        env = self._env(rank, local_rank, replacement, child_sock.fileno())
        proc, how = None, "exec"
        zygote = self._ready_zygote()
        if zygote is not None:
            try:  # the child gets its own copy of the socket; NCL_AGENT_FD names that fd
                proc, how = zygote.spawn([self.args.script, *self.args.script_args], env,
                                         child_sock), "fork"
            except ZygoteError as err:
                # keep the zygote: the children it forked before live as long as it does
                log.warning("cannot fork from the zygote (%s): starting processes with exec "
                            "from now on", err)
                self.fork = False
        if proc is None:
            cmd = [sys.executable, "-u", self.args.script, *self.args.script_args]
            proc = subprocess.Popen(cmd, env=env, pass_fds=(child_sock.fileno(),))
        child_sock.close()
        child = Child(proc=proc, channel=channel, rank=rank, local_rank=local_rank)
        self.selector.register(channel.sock, selectors.EVENT_READ, child)
        # "started rank R (pid P)" is parsed by scripts/bench/goodput.py: keep it first
        log.info("started %s (pid %d)%s", f"rank {rank}" if rank is not None else "a warm spare",
                 proc.pid, " forked from the zygote" if how == "fork" else "")
        return child

    # ------------------------------------------------------------------ zygote
    def _start_zygote(self) -> None:
        """Start the template process early: its imports overlap the agent's start-up."""
        if not self.fork:
            return
        try:
            self.zygote = Zygote(self.args.script, self._base_env())
        except (OSError, ZygoteError) as err:
            log.warning("cannot start the zygote (%s): starting processes with exec", err)
            self.fork = False

    def _ready_zygote(self) -> Optional[Zygote]:
        """The zygote to fork from, once it has imported its modules; None: use exec."""
        if not self.fork or self.zygote is None:
            return None
        if not self.zygote_checked:
            self.zygote_checked = True
            try:
                info = self.zygote.ready()
            except ZygoteError as err:  # nothing was forked from it yet: stop it
                log.warning("%s: starting processes with exec", err)
                self.fork = False
                self._stop_zygote()
                return None
            log.info("zygote (pid %d) ready: %d modules imported in %.1fs; ranks and spares "
                     "are forked from it", info["pid"], info["modules"], info["seconds"])
            for failure in info["failed"]:
                log.debug("zygote: not preloaded: %s", failure)
        return self.zygote

    def _stop_zygote(self) -> None:
        if self.zygote is not None:
            zygote, self.zygote = self.zygote, None
            zygote.close()

    # ------------------------------------------------------------------ watch
    def _watch_generations(self) -> None:
        """Tell local ranks about every new generation (set by any agent)."""
        while not self.stopping:
            nxt = self.gen + 1
            try:
                self.store.wait([f"gen/{nxt}"], datetime.timedelta(seconds=0.5))
            except Exception:  # timeout or a store hiccup: look again
                continue
            self._fence(nxt)
            with self.lock:
                if nxt > self.gen:
                    self.gen = nxt
                for child in list(self.ranks.values()):
                    child.channel.send({"t": "gen", "gen": self.gen})

    def _fence(self, gen: int) -> None:
        """A standby took this node over (it could not reach us): our ranks are no longer
        the job's, so stop them at once instead of competing with the new owners."""
        try:
            record = json.loads(self.store.get(f"gen/{gen}"))
        except Exception:
            return
        owner = record.get("taken_over_by")
        if owner and record.get("node") == self.node_rank and owner != self.owner_id:
            log.error("node %d was taken over by %s at generation %d: stopping this node's "
                      "ranks", self.node_rank, owner, gen)
            self.stopping = True
            for child in [*self.ranks.values(), *self.spares]:
                if child.proc.poll() is None:
                    child.proc.kill()
            os._exit(1)

    # ------------------------------------------------------------------ standby
    def _standby(self) -> bool:
        """Wait, warm, for a node to be lost; True once this agent has taken one over,
        False when the job finished without needing it."""
        timeout = datetime.timedelta(seconds=self.args.store_timeout)
        self.store = connect(self.peers, self.identity, timeout)
        self.peers = self.store.refresh_endpoints()
        for _ in range(self.nproc):
            self.spares.append(self._spawn(None, None, replacement=True))
        log.info("standby node: %d warm processes, watching %d nodes", self.nproc,
                 len(self.peers))
        down_since: dict[int, float] = {}
        probe = wire.blobs(b"job/nodes_done")
        while True:
            replies = self.store.probe_servers(probe)
            done = max((int(wire.unblobs(r)[0] or 0) for r in replies if r is not None),
                       default=0)
            if done >= self.args.nnodes:
                log.info("standby node: the job finished")
                return False
            now = time.monotonic()
            for i, reply in enumerate(replies):
                if reply is None:
                    down_since.setdefault(i, now)
                else:
                    down_since.pop(i, None)
            for i, since in sorted(down_since.items()):
                if now - since >= self.args.lost_after and self._claim(i):
                    self._take_over(i)
                    return True
            for spare in list(self.spares):  # keep the warm processes warm
                if spare.proc.poll() is not None:
                    self.spares.remove(spare)
                    self.spares.append(self._spawn(None, None, replacement=True))
            time.sleep(0.2)

    def _claim(self, node: int) -> bool:
        """One standby wins node ``node`` for the current generation."""
        gen = current_generation(self.store)
        won = int(self.store.add(f"node/{node}/claim/{gen}", 1)) == 1
        if not won:
            log.info("node %d is lost; another standby claimed it", node)
        return won

    def _take_over(self, node: int) -> None:
        detected = time.time()
        self.node_rank = node
        host = self.args.standby_host or socket.gethostname()
        port = self.args.standby_port or free_port()
        bind = "0.0.0.0" if host not in ("127.0.0.1", "localhost") else host
        self.server = StoreServer(bind, port, self.identity).start()
        self.store.publish_endpoint(node, (host, port))
        self.peers = self.store.refresh_endpoints()
        self.store.set(f"node/{node}/owner", self.owner_id)
        ranks = self.local_rank_ids()
        self.gen = bump_generation(self.store, {
            "reason": f"node {node} lost: standby took it over", "node": node,
            "ranks": ranks, "detected_at": detected, "fault_at": self._fault_time(ranks),
            "taken_over_by": self.owner_id})
        log.warning("node %d lost: this standby takes it over (store shard at %s:%d, ranks "
                    "%s) at generation %d", node, host, port, ranks, self.gen)
        with self.lock:
            for local_rank, rank in enumerate(ranks):
                spare = self.spares.pop(0)
                spare.rank, spare.local_rank = rank, local_rank
                spare.last_heartbeat = time.monotonic()
                spare.channel.send({"t": "assign", "rank": rank, "local_rank": local_rank,
                                    "node_rank": node, "gen": self.gen})
                self.ranks[rank] = spare
                log.info("warm spare pid %d takes rank %d at generation %d", spare.proc.pid,
                         rank, self.gen)
            if self.args.spares:
                self.refill_at = time.monotonic() + self.args.spare_refill_delay
        threading.Thread(target=self._watch_generations, daemon=True).start()

    def run(self) -> int:
        """Supervise until every local rank finished; return the exit code."""
        self._start_zygote()
        if self.args.standby:
            if not self._standby():
                return self._finish_standby()
        else:
            self.start()
        while True:
            # A rank that dies closes its channel first, which wakes this loop at once; its
            # exit code follows a moment later, so look every poll_interval while one is
            # pending and every idle_poll_interval otherwise (heartbeats wake the loop too).
            # An agent of the goodput job takes 0.7% of a core instead of 1.5% at a flat
            # 10 ms; on a rehearsal machine that CPU is taken from the ranks.
            exiting = any(c.hung_up and not c.finished for c in self.ranks.values())
            poll = self.args.poll_interval if exiting else self.args.idle_poll_interval
            for key, _ in self.selector.select(timeout=poll):
                child: Child = key.data
                messages = child.channel.recv(timeout=0)
                if messages is None:
                    self.selector.unregister(key.fileobj)
                    child.hung_up = True
                    continue
                child.last_heartbeat = time.monotonic()
                child.heartbeat_seen = True
                for msg in messages:
                    if msg.get("t") == "hello":
                        child.hello = True
                        child.recovery = bool(msg.get("recovery"))
                    elif msg.get("t") == "done":
                        child.done = True
            with self.lock:
                for rank, child in list(self.ranks.items()):
                    if child.finished:
                        continue
                    code = child.proc.poll()
                    if code == 0:
                        child.finished = True
                    elif code is not None and (not child.recovery or not child.hello
                                               or code == EXIT_UNRECOVERABLE):
                        why = ("recovery is off" if not child.recovery else
                               "and cannot be recovered" if code == EXIT_UNRECOVERABLE else
                               "before it started training (bad config or environment?)")
                        log.error("rank %d failed (exit code %d) %s: stopping the job", rank,
                                  code, why)
                        self.stopping = True
                        for other in [*self.ranks.values(), *self.spares]:
                            if other.proc.poll() is None:
                                other.proc.kill()
                        return code if code > 0 else 1
                    elif code is not None:
                        self._replace(rank, child, f"exit code {code}")
                    elif (child.heartbeat_seen and not child.done and
                          time.monotonic() - child.last_heartbeat > self.args.hang_timeout):
                        log.error("rank %d: no heartbeat for %.1fs: killing it", rank,
                                  self.args.hang_timeout)
                        child.proc.kill()
                        child.proc.wait()
                        self._replace(rank, child, "hung (no heartbeat)")
                self.spares = [s for s in self.spares if s.proc.poll() is None]
                if self.refill_at is not None and time.monotonic() >= self.refill_at:
                    self.refill_at = None
                    while len(self.spares) < self.args.spares:
                        self.spares.append(self._spawn(None, None, replacement=True))
            if all(c.finished for c in self.ranks.values()):
                return self._finish()

    def _fault_time(self, ranks: list[int]) -> Optional[float]:
        for rank in ranks:
            key = f"fault/at/{rank}"
            try:
                if self.store.check([key]):
                    return float(self.store.get(key))
            except Exception:
                pass
        return None

    def _replace(self, rank: int, dead: Child, reason: str) -> None:
        detected = time.time()
        log.error("rank %d failed (%s): replacing it", rank, reason)
        try:
            self.selector.unregister(dead.channel.sock)
        except (KeyError, ValueError):
            pass
        dead.channel.close()
        self.gen = bump_generation(self.store, {
            "reason": reason, "node": self.node_rank, "ranks": [rank],
            "detected_at": detected, "fault_at": self._fault_time([rank])})
        local_rank = dead.local_rank
        if self.spares:
            spare = self.spares.pop(0)
            spare.rank, spare.local_rank = rank, local_rank
            spare.last_heartbeat = time.monotonic()
            spare.channel.send({"t": "assign", "rank": rank, "local_rank": local_rank,
                                "gen": self.gen})
            self.ranks[rank] = spare
            log.info("warm spare pid %d takes rank %d at generation %d", spare.proc.pid, rank,
                     self.gen)
            # refill later: a spare's imports would compete with the recovery for CPU
            self.refill_at = time.monotonic() + self.args.spare_refill_delay
        else:
            self.ranks[rank] = self._spawn(rank, local_rank, replacement=True)
        for child in self.ranks.values():
            if child.rank != rank:
                child.channel.send({"t": "gen", "gen": self.gen})

    def _finish(self) -> int:
        self.stopping = True
        for spare in self.spares:
            spare.proc.kill()
        for spare in self.spares:
            spare.proc.wait()
        self._stop_zygote()
        try:
            self.store.add("job/nodes_done", 1)
            deadline = time.monotonic() + self.args.store_timeout
            while self.server is not None and time.monotonic() < deadline:
                if int(self.store.add("job/nodes_done", 0)) >= self.args.nnodes:
                    break
                time.sleep(0.05)
        except Exception as err:  # the store may already be gone with another node
            log.warning("could not wait for the other nodes: %s", err)
        self._remove_data_cache()
        if self.server is not None:
            self.server.stop()
        log.info("node %d: all ranks finished", self.node_rank)
        return 0

    def _finish_standby(self) -> int:
        self.stopping = True
        for spare in self.spares:
            spare.proc.kill()
        for spare in self.spares:
            spare.proc.wait()
        self._stop_zygote()
        return 0

    def _remove_data_cache(self) -> None:
        """The job's shared-memory batch cache on this node (tier 2) is no longer needed."""
        from ..data.shm_cache import remove_job_cache

        root = os.environ.get("NCL_DATA_CACHE_PATH", "/dev/shm")
        remove_job_cache(root, self.identity.job_id)

    def shutdown(self, *_: Any) -> None:
        self.stopping = True
        for child in [*self.ranks.values(), *self.spares]:
            if child.proc.poll() is None:
                child.proc.kill()
        sys.exit(1)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ncl-launch",
        description="Node agent for checkpointless training (torchrun-compatible flags).")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=1)
    p.add_argument("--node-rank", "--node_rank", type=int,
                   default=int(os.environ.get("SLURM_NODEID", os.environ.get("NODE_RANK", 0))))
    p.add_argument("--peers", default=None,
                   help="store endpoints of all agents, node rank order: host:port,host:port")
    p.add_argument("--rdzv-endpoint", "--rdzv_endpoint", default=None,
                   help="torchrun-style single endpoint host:port (served by node 0)")
    p.add_argument("--master-addr", "--master_addr", default=None)
    p.add_argument("--master-port", "--master_port", type=int, default=29400)
    p.add_argument("--spares", type=int, default=0, help="warm spare processes per node")
    p.add_argument("--spare-refill-delay", type=float,
                   default=float(os.environ.get("NCL_SPARE_REFILL_DELAY_S", "5")),
                   help="seconds after a spare takes a rank before a new spare is started")
    p.add_argument("--hang-timeout", type=float,
                   default=float(os.environ.get("NCL_HANG_TIMEOUT_S", "3.0")),
                   help="seconds without a heartbeat before a rank is killed as hung")
    p.add_argument("--store-timeout", type=float,
                   default=float(os.environ.get("NCL_STORE_TIMEOUT_S", "60")))
    p.add_argument("--standby", action="store_true",
                   help="a warm standby node: no node rank of its own; its processes take "
                        "over the ranks of the first node that is lost (needs --peers)")
    p.add_argument("--standby-host", default=None,
                   help="address a standby serves the store from once it takes a node over "
                        "(default: this host's name)")
    p.add_argument("--standby-port", type=int, default=0,
                   help="port for that (default: a free one)")
    p.add_argument("--lost-after", type=float,
                   default=float(os.environ.get("NCL_NODE_LOST_AFTER_S", "1.0")),
                   help="seconds a node's store server stays unreachable before a standby "
                        "takes the node over")
    p.add_argument("--poll-interval", type=float, default=0.01,
                   help="seconds between looks for the exit code of a rank whose channel "
                        "closed (on the recovery path)")
    p.add_argument("--idle-poll-interval", type=float, default=0.1,
                   help="seconds between looks at the ranks otherwise (hang and refill "
                        "checks; a rank's exit or message wakes the agent at once)")
    p.add_argument("--spawn", default=os.environ.get("NCL_SPAWN", "fork"),
                   help="how ranks and spares start: 'fork' from a zygote that imported the "
                        "script's modules once (default), or 'exec' a new interpreter each "
                        "(NCL_SPAWN)")
    p.add_argument("--job-id", default=os.environ.get("NCL_JOB_ID"))
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.spawn not in ("fork", "exec"):
        p.error(f"--spawn (or NCL_SPAWN) must be 'fork' or 'exec', not {args.spawn!r}")
    if args.peers is None:
        endpoint = args.rdzv_endpoint or (
            f"{args.master_addr}:{args.master_port}" if args.master_addr else None)
        if endpoint is None:
            if args.nnodes > 1:
                p.error("name the peer nodes: --peers host0:port,host1:port,... "
                        "(or --rdzv-endpoint host:port served by node 0)")
            endpoint = f"127.0.0.1:{args.master_port}"
        args.peers = endpoint
    if args.standby:
        if len(parse_endpoints(args.peers)) != args.nnodes:
            p.error("--standby watches every node's store server: give --peers with one "
                    f"host:port per node ({args.nnodes})")
        args.node_rank = None
    elif not 0 <= args.node_rank < args.nnodes:
        p.error(f"--node-rank {args.node_rank} is outside 0..{args.nnodes - 1}")
    secret = os.environ.get("NCL_JOB_SECRET")
    if secret is None:
        if args.nnodes > 1:
            p.error("NCL_JOB_SECRET is not set: export the same secret for every agent of "
                    "the job (scripts/slurm/pretrain.sbatch generates one)")
        generated = JobIdentity.generate(args.job_id)
        args.job_id, secret = generated.job_id, generated.secret
    args.job_id = args.job_id or "ncl-job"
    args.job_secret = secret
    return args


def kill_node(agent_pid: int) -> None:
    """Kill a whole node: its agent and every process the agent started."""
    os.killpg(os.getpgid(agent_pid), signal.SIGKILL)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("NCL_LOG_LEVEL", "INFO"),
        format=f"[%(asctime)s] [agent {'standby' if args.standby else args.node_rank}] "
               "%(levelname)s: %(message)s")
    agent = NodeAgent(args)
    signal.signal(signal.SIGTERM, agent.shutdown)
    signal.signal(signal.SIGINT, agent.shutdown)
    sys.exit(agent.run())


if __name__ == "__main__":
    main()
