"""Tier 1: form the world with no root store, from the launcher's environment alone.

    world = nemo_checkpointless.comm.init()          # torchrun, srun, ncl-launch, Kubernetes
    parallel.initialize(strategy)                    # megatron groups, members-only
    world.report_store_ops("start-up")

Where the store servers come from (first match wins):

1. ``NCL_STORE_ENDPOINTS=host:port,...`` — served by the node agents (``ncl-launch``), or by
   the ranks themselves with ``NCL_STORE_SELF_HOST=1``.
2. Slurm (``SLURM_JOB_NODELIST``): one shard on each of up to ``NCL_STORE_SHARDS`` (64)
   nodes, spread evenly, at ``NCL_STORE_PORT`` (default 20000 + job id mod 10000: below
   the ephemeral range, 32768 up, where gloo, NCCL and outgoing connections get theirs).
3. Kubernetes headless service: ``NCL_STORE_HOST_TEMPLATE`` such as
   ``trainer-{node}.trainer-svc`` with ``{node}`` = 0..nnodes-1, at ``NCL_STORE_PORT``.
4. torchrun alone: ``MASTER_ADDR``; one node: ``NCL_STORE_SHARDS`` (4) shards on local
   ranks 0..k-1 at ``MASTER_PORT+1+i``; several nodes: one shard per node at
   ``MASTER_PORT+1`` whose hosts are learned once through torchrun's own rendezvous store.

Self-hosted shards run in a child process of the hosting rank (local rank 0 of a shard
node, or local rank i on one node) that dies with it. Losing any one shard loses only its
keys; the generation is replicated on every shard, and every generation uses fresh keys.
Limits, stated plainly: with self-hosted shards a lost node takes its shard away until a
rank on a replacement node serves it again (same host:port); under multi-node torchrun
without a peer list the first start needs torchrun's rendezvous host once (re-forming does
not). Without ``NCL_JOB_SECRET`` the secret is derived from the job's rendezvous address:
it keeps jobs apart by accident, not against a hostile process.

Timeouts (``timeouts.py``): ``timeout`` bounds every collective (``pg_s``: 60 s on gloo,
600 s on NCCL); ``store_timeout`` bounds every store wait and the wait for unreachable
servers (``store_s``, 120 s).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import hashlib
import logging
import os
import re
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist

from ..megatron.groups import enable_local_group_sync
from .store import (Endpoint, JobIdentity, ShardedStore, StoreServer, connect,
                    format_endpoints, parse_endpoints)
from .world import backend_for, default_timeout, device_kwargs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job, from torchrun / srun / ncl-launch variables."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    nnodes: int
    master_addr: Optional[str]
    master_port: Optional[int]

    @classmethod
    def from_env(cls, env: Optional[dict] = None) -> "LaunchEnv":
        e = os.environ if env is None else env

        def first(*names: str, default: Optional[str] = None) -> Optional[str]:
            for n in names:
                if e.get(n):
                    return e[n]
            return default

        rank = first("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")
        world = first("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
        if rank is None or world is None:
            raise RuntimeError("no rank in the environment: launch with torchrun, srun or "
                               "ncl-launch, or set RANK and WORLD_SIZE for every process")
        local_rank = int(first("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK",
                               default="0"))
        local_world = first("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")
        if local_world is None and e.get("SLURM_TASKS_PER_NODE"):
            local_world = re.match(r"\d+", e["SLURM_TASKS_PER_NODE"]).group(0)
        local_world_i = int(local_world or world)
        node = first("GROUP_RANK", "NODE_RANK", "SLURM_NODEID")
        node_rank = int(node) if node is not None else int(rank) // local_world_i
        nnodes = int(first("NNODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES",
                           default=str(max(1, int(world) // local_world_i))))
        port = first("MASTER_PORT")
        return cls(int(rank), int(world), local_rank, local_world_i, node_rank, nnodes,
                   first("MASTER_ADDR"), int(port) if port else None)


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed node list: ``a[01-03,7],b`` -> ``[a01, a02, a03, a7, b]``."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", text):
        m = re.match(r"^(.*?)\[([^\]]*)\](.*)$", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


@dataclass
class StorePlan:
    """Which servers hold the store, and which of them this process must serve."""

    endpoints: list[Endpoint]
    source: str
    serve: list[int] = field(default_factory=list)  # endpoint indices this process hosts


def _spread(nnodes: int, k: int) -> list[int]:
    return sorted({(i * nnodes) // k for i in range(k)})


def plan_store(le: LaunchEnv, env: Optional[dict] = None) -> StorePlan:
    """Resolve the store servers from the environment (see the module docstring)."""
    e = os.environ if env is None else env
    shards = int(e.get("NCL_STORE_SHARDS", "0")) or None

    def node_hosted(hosts: list[str], port: int, source: str) -> StorePlan:
        nodes = _spread(len(hosts), min(len(hosts), shards or 64))
        eps = [(hosts[n], port) for n in nodes]
        serve = [i for i, n in enumerate(nodes) if n == le.node_rank and le.local_rank == 0]
        return StorePlan(eps, source, serve)

    if e.get("NCL_STORE_ENDPOINTS"):
        eps = parse_endpoints(e["NCL_STORE_ENDPOINTS"])
        serve: list[int] = []
        if e.get("NCL_STORE_SELF_HOST", "0") == "1":
            if le.nnodes == 1:
                serve = [le.local_rank] if le.local_rank < len(eps) else []
            elif len(eps) > le.nnodes:
                raise RuntimeError(f"NCL_STORE_SELF_HOST=1 with {len(eps)} endpoints on "
                                   f"{le.nnodes} nodes: give at most one endpoint per node")
            else:
                serve = [le.node_rank] if le.local_rank == 0 and le.node_rank < len(eps) else []
        return StorePlan(eps, "NCL_STORE_ENDPOINTS", serve)
    port = int(e["NCL_STORE_PORT"]) if e.get("NCL_STORE_PORT") else None
    nodelist = e.get("SLURM_JOB_NODELIST") or e.get("SLURM_NODELIST")
    if nodelist and e.get("SLURM_JOB_ID"):
        port = port or 20000 + int(e["SLURM_JOB_ID"]) % 10000
        return node_hosted(expand_hostlist(nodelist), port, "Slurm node list")
    if e.get("NCL_STORE_HOST_TEMPLATE"):
        if port is None:
            raise RuntimeError("NCL_STORE_HOST_TEMPLATE needs NCL_STORE_PORT")
        hosts = [e["NCL_STORE_HOST_TEMPLATE"].format(node=n) for n in range(le.nnodes)]
        return node_hosted(hosts, port, "NCL_STORE_HOST_TEMPLATE")
    if le.master_addr is None or le.master_port is None:
        raise RuntimeError("no store servers: set NCL_STORE_ENDPOINTS (ncl-launch does), run "
                           "under Slurm, set NCL_STORE_HOST_TEMPLATE + NCL_STORE_PORT, or "
                           "launch with torchrun (MASTER_ADDR/MASTER_PORT)")
    base = port or le.master_port + 1
    if le.nnodes == 1:
        k = min(shards or 4, le.local_world_size)
        eps = [(le.master_addr, base + i) for i in range(k)]
        return StorePlan(eps, "torchrun (one node)", [le.local_rank] if le.local_rank < k else [])
    return StorePlan([], "torchrun (several nodes)", [])  # hosts learned by _bootstrap_hosts


def default_identity(le: LaunchEnv, env: Optional[dict] = None) -> JobIdentity:
    """``NCL_JOB_ID``/``NCL_JOB_SECRET``, else one derived from the job's rendezvous."""
    e = os.environ if env is None else env
    if e.get("NCL_JOB_ID") and e.get("NCL_JOB_SECRET"):
        return JobIdentity(e["NCL_JOB_ID"], e["NCL_JOB_SECRET"])
    job_id = (e.get("NCL_JOB_ID") or e.get("TORCHELASTIC_RUN_ID") or e.get("SLURM_JOB_ID")
              or "local")
    basis = f"ncl-derived:{job_id}:{le.master_addr}:{le.master_port}:{e.get('SLURM_JOB_ID')}"
    if le.rank == 0:
        log.warning("NCL_JOB_SECRET is not set: using a secret derived from the job's "
                    "rendezvous, which keeps jobs apart by accident but not against a hostile "
                    "process; export NCL_JOB_SECRET (e.g. `openssl rand -hex 16`) to every rank")
    return JobIdentity(job_id, hashlib.sha256(basis.encode()).hexdigest()[:32])


# ---------------------------------------------------------------------------------------
# Hosting a shard from a rank
# ---------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def host_shard(endpoint: Endpoint, identity: JobIdentity) -> int:
    """Serve ``endpoint`` from a child process that dies with this one; returns its pid.

    Forked (not spawned): no interpreter start-up, and the child touches no torch state.
    Raises OSError with the reason if the port cannot be bound.
    """
    host, port = endpoint
    bind_host = host if _is_ip(host) else "0.0.0.0"
    r, w = os.pipe()
    ppid = os.getpid()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            _die_with_parent()
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            if os.getppid() != ppid:
                os._exit(0)
            server = StoreServer(bind_host, port, identity).bind()
            os.write(w, b"ok")
            os.close(w)
            server.serve_forever()
        except BaseException as err:  # report to the parent, never return into its code
            try:
                os.write(w, f"error: {err}".encode())
            except OSError:
                pass
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    msg = os.read(r, 4096).decode()
    os.close(r)
    if msg != "ok":
        os.waitpid(pid, 0)
        raise OSError(f"could not serve the store shard {host}:{port}: {msg or 'child died'}")
    return pid


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return True
    except OSError:
        return False


def _bootstrap_hosts(le: LaunchEnv, identity: JobIdentity, timeout: datetime.timedelta,
                     port: int) -> list[Endpoint]:
    """Multi-node torchrun without a peer list: learn each node's address once through
    torchrun's rendezvous store (the only use of a single host, and only at first start)."""
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    tcp = dist.TCPStore(le.master_addr, le.master_port, le.world_size,
                        is_master=le.rank == 0 and not agent_store, timeout=timeout)
    ns = f"ncl/store-hosts/{identity.job_id}/"
    if le.local_rank == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((le.master_addr, le.master_port))
            tcp.set(f"{ns}{le.node_rank}", s.getsockname()[0])
    keys = [f"{ns}{n}" for n in range(le.nnodes)]
    tcp.wait(keys)
    return [(tcp.get(k).decode(), port) for k in keys]


# ---------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------


def store_timeout_default() -> datetime.timedelta:
    """``timeouts.store_s`` (resolved by the agent, or from the environment)."""
    from ..timeouts import Timeouts

    return Timeouts.from_env().delta("store_s")


def pg_prefix(generation: int) -> str:
    """Store prefix of one generation's process groups; a new generation never reads
    an older one's keys."""
    return f"pg/{generation}/"


def form_world(store: dist.Store, rank: int, world_size: int, generation: int,
               backend: str = "auto", timeout: Optional[datetime.timedelta] = None) -> None:
    """``init_process_group`` for ``generation`` over ``store`` (keys under ``pg/<G>/``).

    On NCCL the rank's device is selected but not bound to the world (``comm/world.py``
    ``group_rebuild="members"``): each later group's communicator is created by its
    members from a unique id in the store, not split from the world's (docs/gpu.md).
    """
    backend = backend_for(backend)
    hint = (store.rendezvous_hint(world_size) if backend == "gloo" and
            isinstance(store, ShardedStore) else contextlib.nullcontext())
    with hint:
        dist.init_process_group(backend=backend,
                                store=dist.PrefixStore(pg_prefix(generation), store),
                                rank=rank, world_size=world_size,
                                timeout=timeout or default_timeout(), **device_kwargs(backend))


def report_store_ops(store: ShardedStore, phase: str, since: Optional[dict] = None,
                     generation: Optional[int] = None) -> tuple[dict[str, int], dict[str, int]]:
    """Log the operations each server served since ``since`` (a previous mark); returns
    ``(delta, mark)``. One request per server; call it from one rank (or one agent)."""
    now = {ep: c.get("total", 0) for ep, c in store.server_op_counts().items()}
    delta = {ep: n - (since or {}).get(ep, 0) for ep, n in now.items()}
    total = sum(delta.values()) or 1
    log.info("store operations during %s%s, per server: %s; busiest server's share %.2f",
             phase, "" if generation is None else f" (generation {generation})",
             ", ".join(f"{ep}={n}" for ep, n in delta.items()),
             max(delta.values(), default=0) / total)
    return delta, now


@dataclass
class Tier1World:
    """The job's store and world group, formed by :func:`init`."""

    store: ShardedStore
    identity: JobIdentity
    env: LaunchEnv
    plan: StorePlan
    generation: int
    backend: str
    timeout: datetime.timedelta
    hosted_pids: list[int] = field(default_factory=list)
    _ops_mark: dict = field(default_factory=dict)

    @property
    def endpoints(self) -> list[Endpoint]:
        return self.plan.endpoints

    def store_ops(self) -> dict[str, int]:
        """Operations each server has served so far (all clients), ``host:port`` -> count."""
        return {ep: c.get("total", 0) for ep, c in self.store.server_op_counts().items()}

    def report_store_ops(self, phase: str) -> dict[str, int]:
        """Rank 0 logs the operations per server since the last report; returns them."""
        if self.env.rank != 0:
            return {}
        delta, self._ops_mark = report_store_ops(self.store, phase, self._ops_mark,
                                                 self.generation)
        return delta

    def reform(self, generation: int) -> None:
        """Destroy the world (and megatron's groups) and form it again for ``generation``."""
        from .world import destroy_world

        destroy_world()
        if self.env.rank == 0:  # nobody needs the old generation's keys again
            self.store.delete_prefix(pg_prefix(self.generation))
        self.generation = generation
        form_world(self.store, self.env.rank, self.env.world_size, generation, self.backend,
                   self.timeout)

    def shutdown(self) -> None:
        from .world import destroy_world

        destroy_world()
        self.store.close()


def init(backend: str = "auto", timeout: Optional[datetime.timedelta] = None, *,
         store_timeout: Optional[datetime.timedelta] = None,
         generation: Optional[int] = None, identity: Optional[JobIdentity] = None,
         local_group_sync: bool = True) -> Tier1World:
    """Form the world with no root store from the launcher's environment.

    ``generation`` (default: ``NCL_GENERATION``, else the store's replicated ``gen``) picks
    the key prefix. ``local_group_sync`` patches megatron's group creation (members-only
    on gloo and on NCCL; see :mod:`nemo_checkpointless.megatron.groups`).
    """
    if dist.is_initialized():
        raise RuntimeError("comm.init(): the world is already initialized in this process; "
                           "use Tier1World.reform(generation) to form it again")
    t0 = time.monotonic()
    le = LaunchEnv.from_env()
    identity = identity or default_identity(le)
    store_timeout = store_timeout or store_timeout_default()
    plan = plan_store(le)
    if not plan.endpoints:
        port = int(os.environ.get("NCL_STORE_PORT") or (le.master_port or 29400) + 1)
        plan.endpoints = _bootstrap_hosts(le, identity, store_timeout, port)
        plan.serve = [le.node_rank] if le.local_rank == 0 else []
    pids = [host_shard(plan.endpoints[i], identity) for i in plan.serve]
    store = connect(plan.endpoints, identity, store_timeout)
    stored_gen = store.ping_all(store_timeout)  # every server reachable, gen read in passing
    if generation is None:
        env_gen = os.environ.get("NCL_GENERATION")
        generation = int(env_gen) if env_gen else int(stored_gen or 0)
    if local_group_sync:
        enable_local_group_sync()
    backend = backend_for(backend)
    timeout = timeout or default_timeout()
    form_world(store, le.rank, le.world_size, generation, backend, timeout)
    world = Tier1World(store, identity, le, plan, generation, backend, timeout, pids)
    if le.rank == 0:
        log.info("tier1: %d ranks formed generation %d in %.2f s over %d store servers (%s: %s)",
                 le.world_size, generation, time.monotonic() - t0, len(plan.endpoints),
                 plan.source, format_endpoints(plan.endpoints))
    return world
