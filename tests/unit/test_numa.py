"""NUMA-aware binding (``ncl-launch --cpu-bind numa``): the CPU lists, and real processes
pinned (every thread of a running one, as for a warm spare that is assigned late)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nemo_checkpointless.launch import numa


def test_cpulists_parse_and_print_back():
    assert numa.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert numa.format_cpulist([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"


def test_ranks_spread_over_nodes_without_gpus_and_follow_their_gpu_with_one():
    nodes = {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    assert [numa.cpus_for(r, 8, nodes)[0] for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert numa.cpus_for(0, 8, nodes, gpu_node=1) == (1, [4, 5, 6, 7])
    assert numa.cpus_for(0, 8, nodes, gpu_node=7)[0] == 0  # unknown node: spread instead


def test_this_hosts_nodes_come_from_sysfs(tmp_path: Path):
    fake = tmp_path / "node"
    (fake / "node0").mkdir(parents=True)
    (fake / "node0" / "cpulist").write_text("0-1\n")
    (fake / "node1").mkdir()
    (fake / "node1" / "cpulist").write_text("2-3\n")
    assert numa.node_cpus(fake) == {0: [0, 1], 1: [2, 3]}
    assert set(sum(numa.node_cpus().values(), [])) <= set(range(os.cpu_count() or 1))


def test_every_thread_of_a_running_process_is_pinned():
    script = ("import threading, time\n"
              "[threading.Thread(target=time.sleep, args=(30,), daemon=True).start() "
              "for _ in range(3)]\nprint('up', flush=True)\ntime.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        cpu = sorted(os.sched_getaffinity(0))[0]
        assert numa.bind(proc.pid, [cpu]) == 4  # the main thread and its three
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            assert os.sched_getaffinity(int(task.name)) == {cpu}
        line = numa.bind_rank(proc.pid, 0, 1, gpu=False)
        assert "bound local rank 0" in line and "NUMA node" in line
    finally:
        proc.kill()
        proc.wait()
