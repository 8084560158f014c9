"""NUMA-aware CPU binding of a node's ranks (``ncl-launch --cpu-bind numa``).

Each rank is pinned to the CPUs of the NUMA node its GPU hangs off (read from the GPU's
PCI device in sysfs, the bus id from ``nvidia-smi``); on a host without GPUs, local ranks
are spread over the NUMA nodes in order. A warm spare is pinned when it is assigned a
rank (its threads are already running, so every thread of it is re-pinned).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

SYS_NODES = Path("/sys/devices/system/node")
MODES = ("none", "numa")


def parse_cpulist(text: str) -> list[int]:
    """``0-3,8,10-11`` -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def node_cpus(root: Path = SYS_NODES) -> dict[int, list[int]]:
    """NUMA node -> its CPUs (one node with every CPU when sysfs says nothing)."""
    nodes = {}
    for path in sorted(root.glob("node[0-9]*")):
        cpus = parse_cpulist((path / "cpulist").read_text()) if (path / "cpulist").exists() \
            else []
        if cpus:
            nodes[int(path.name[4:])] = cpus
    return nodes or {0: sorted(os.sched_getaffinity(0))}


def gpu_numa_node(local_rank: int) -> Optional[int]:
    """The NUMA node of CUDA device ``local_rank`` (None: no GPU, or sysfs does not say)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=pci.bus_id", "--format=csv,noheader",
                              "-i", str(local_rank)], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    bus = out.lower()
    if bus.count(":") == 2 and len(bus.split(":")[0]) == 8:  # 00000000:3B:00.0
        bus = bus[4:]
    try:
        node = int((Path("/sys/bus/pci/devices") / bus / "numa_node").read_text())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def cpus_for(local_rank: int, nproc: int, nodes: Optional[dict[int, list[int]]] = None,
             gpu_node: Optional[int] = None) -> tuple[int, list[int]]:
    """(NUMA node, its CPUs) for ``local_rank`` of ``nproc``: its GPU's node if known,
    else local ranks spread over the nodes in order."""
    nodes = nodes if nodes is not None else node_cpus()
    order = sorted(nodes)
    node = gpu_node if gpu_node in nodes else order[local_rank * len(order) // max(nproc, 1)]
    return node, nodes[node]


def bind(pid: int, cpus: list[int]) -> int:
    """Pin every thread of process ``pid`` to ``cpus``; returns how many threads."""
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
            count += 1
        except (ProcessLookupError, PermissionError, OSError):
            continue  # a thread that just ended
    return count


def bind_rank(pid: int, local_rank: int, nproc: int, gpu: bool) -> Optional[str]:
    """Pin rank process ``pid`` (local rank ``local_rank``); a log line, or None."""
    node, cpus = cpus_for(local_rank, nproc, gpu_node=gpu_numa_node(local_rank) if gpu
                          else None)
    threads = bind(pid, cpus)
    return (f"bound local rank {local_rank} (pid {pid}, {threads} threads) to NUMA node "
            f"{node}: CPUs {format_cpulist(cpus)}")


def format_cpulist(cpus: list[int]) -> str:
    """[0, 1, 2, 3, 8] -> ``0-3,8``."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)
