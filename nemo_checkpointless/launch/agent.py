"""``ncl-launch``: the node agent's command line. torchrun-compatible flags, warm spares, no restarts.

One agent per node starts the node's ranks, serves a share of the job's store, watches
its ranks and the other nodes, and on a failure hands the dead rank's id to a warm spare
(or a fresh process), bumps the job's generation and tells its local ranks. Healthy ranks
are never restarted (``supervisor.py``).

    ncl-launch --nnodes 2 --nproc-per-node 2 --node-rank 0 \\
        --peers host0:29400,host1:29400 --spares 1 recipes/pretrain.py checkpointless=tier4

A replacement node is a new agent started with the same ``--node-rank``. A *standby node*
(``--standby``) has no node rank of its own and takes over the first node that is lost
(``standby.py``). Ranks and spares are forked from a zygote (``--spawn fork``, the
default; ``zygote.py``) or started with exec. Every timeout is a flag or an ``NCL_*``
variable (``timeouts.py``); the agent exports the resolved values to its ranks. So are the
limits on repeated failures (``limits.py``): a rank whose processes die
``--max-start-failures`` times in a row before completing a step stops the job (exit 3).
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import logging
import os
import signal
import sys
from typing import Optional

from ..comm.store import JobIdentity, parse_endpoints
from ..timeouts import TimeoutConfigError, Timeouts
from .limits import AgentLimits, LimitConfigError


def _add_timeout_flags(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(Timeouts):
        meta = f.metadata
        if meta["flag"]:
            p.add_argument(meta["flag"], dest=f"timeout_{f.name}", default=None,
                           metavar="S" if f.name != "hang_factor" else "X",
                           help=f"{meta['meaning']} ({meta['env']}; default "
                                f"{meta['default_doc']})")


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(AgentLimits):
        meta = f.metadata
        p.add_argument(meta["flag"], dest=f"limit_{f.name}", default=None, metavar="N",
                       help=f"{meta['meaning']} ({meta['env']}; default {f.default}; "
                            "0: no limit)")


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
    p.add_argument("--standby", action="store_true",
                   help="a warm standby node: no node rank of its own; its processes take "
                        "over the ranks of the first node that is lost (needs --peers)")
    p.add_argument("--standby-host", default=None,
                   help="address a standby serves the store from once it takes a node over "
                        "(default: this host's name)")
    p.add_argument("--standby-port", type=int, default=0,
                   help="port for that, listened on from the standby's start (empty until "
                        "a takeover), so a port in use fails at start (default: a free one)")
    p.add_argument("--standby-peers", default="",
                   help="the --standby-host:--standby-port of every standby of the job "
                        "(host:port,...): where a shard may have moved. An agent whose --peers "
                        "predates a takeover (a node restarted with the job's first peer "
                        "list, as on Kubernetes) finds the job through them")
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
    p.add_argument("--gpu-probe", default=os.environ.get("NCL_GPU_PROBE") or None,
                   help="shell command that checks GPU {device} after a rank's device error "
                        "(exit 0: healthy); default: a small CUDA program, skipped on hosts "
                        "without a GPU (NCL_GPU_PROBE)")
    p.add_argument("--cpu-bind", default=os.environ.get("NCL_CPU_BIND", "none"),
                   choices=("none", "numa"),
                   help="'numa': pin each rank to the CPUs of its GPU's NUMA node (on a host "
                        "without GPUs, local ranks spread over the nodes); 'none' (default): "
                        "leave the placement to the OS (NCL_CPU_BIND)")
    p.add_argument("--job-id", default=os.environ.get("NCL_JOB_ID"))
    _add_timeout_flags(p)
    _add_limit_flags(p)
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    try:
        args.timeouts = Timeouts.resolve(
            flags={f.name: getattr(args, f"timeout_{f.name}", None)
                   for f in dataclasses.fields(Timeouts)}, env=os.environ)
    except TimeoutConfigError as err:
        p.error(str(err))
    try:
        args.limits = AgentLimits.resolve(
            flags={f.name: getattr(args, f"limit_{f.name}", None)
                   for f in dataclasses.fields(AgentLimits)}, env=os.environ)
    except LimitConfigError as err:
        p.error(str(err))
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
    try:
        args.standby_lookups = parse_endpoints(args.standby_peers) if args.standby_peers \
            else []
    except ValueError as err:
        p.error(f"--standby-peers: {err}")
    if args.standby and args.standby_peers and not args.standby_port:
        p.error("--standby-peers names where each standby serves once it takes a node over: "
                "give this standby its own address there with --standby-port (and "
                "--standby-host)")
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
    from .supervisor import NodeAgent

    agent = NodeAgent(args)
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # `kill -USR2`: the stacks
    # a scheduler's stop (SIGTERM) or a time limit's warning (SIGUSR1): checkpoint, exit 143
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGUSR1, agent.request_stop)
    signal.signal(signal.SIGINT, agent.shutdown)
    sys.exit(agent.run())


if __name__ == "__main__":
    main()
