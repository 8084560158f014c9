"""Supervisors for the peer libraries' runs, and what is read from their timelines.

Imported by ``scripts/bench/peers.py`` (core venv); the workers it starts run in the
library's own venv. Every run writes ``<out>/*.jsonl`` timelines (``common.Timeline``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

from nemo_checkpointless import allocator

HERE = Path(__file__).resolve().parent
WORLD = 4


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_timelines(out: Path) -> list[dict]:
    events = []
    for path in sorted(out.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            events.append(dict(json.loads(line), source=path.stem))
    return sorted(events, key=lambda e: e["t"])


def _env(out: Path, **extra: str) -> dict:
    """The peers' workers get the host allocator our ranks get (tcmalloc under CPU rehearsal,
    allocator.py), so that no side is slowed by glibc's malloc."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PEERS_OUT=str(out), PYTHONUNBUFFERED="1", **extra)
    env.update(allocator.worker_env(env))
    return env


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


# Lighthouse settings. default: the command in torchft's README (quorum tick 100 ms, join
# timeout 10 s; heartbeat timeout left at its 5 s default); tuned: heartbeat timeout 500 ms
# (10 of the Manager's 50 ms heartbeats), 10 ms tick, 1 s join wait for a heartbeating
# straggler (a replacement between creating its Manager and asking for its first quorum).
LIGHTHOUSE = {"default": ["--quorum_tick_ms", "100", "--join_timeout_ms", "10000"],
              "tuned": ["--join_timeout_ms", "1000", "--quorum_tick_ms", "10",
                                        "--heartbeat_timeout_ms", "500"]}


def run_torchft(venv: Path, out: Path, *, steps: int, kill_step: int, tuned: bool,
                min_replicas: int = 1, warm: bool = False, deadline_s: float = 900) -> None:
    """Lighthouse + 4 replica groups; replica 1 kills itself at ``kill_step`` and this
    supervisor hands its replica to a replacement at once (torchft expects a scheduler to
    do so): a cold one started then, or with ``warm`` one started with the job that has
    built its model and waits (``torchft_worker.py --standby``), as our warm spare does.
    ``min_replicas``: the lighthouse's and every Manager's minimum (with 4 the survivors
    wait for the replacement instead of training on without it)."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(out / "log.txt", "w")
    lighthouse = subprocess.Popen(
        [str(venv / "bin" / "torchft_lighthouse"), "--bind", f"[::]:{port}",
         "--min_replicas", str(min_replicas), *LIGHTHOUSE["tuned" if tuned else "default"]],
        stdout=log, stderr=subprocess.STDOUT)
    env = _env(out, TORCHFT_LIGHTHOUSE=f"http://localhost:{port}")

    def start(replica: Optional[int], restarted: bool) -> subprocess.Popen:
        who = ["--standby"] if replica is None else ["--replica", str(replica)]
        cmd = [str(venv / "bin" / "python"), str(HERE / "torchft_worker.py"), *who,
               "--steps", str(steps), "--kill-step", str(kill_step),
               "--min-replicas", str(min_replicas)] + (["--tuned"] if tuned else [])
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.PIPE if replica is None else None,
                                env=dict(env, PEERS_RESTARTED="1" if restarted else "0"))

    workers = {r: start(r, False) for r in range(WORLD)}
    standby = start(None, True) if warm and kill_step >= 0 else None
    procs = list(workers.values()) + ([standby] if standby else [])
    replaced = False
    t_end = time.time() + deadline_s
    try:
        while any(p.poll() is None for p in workers.values()):
            if time.time() > t_end:
                raise TimeoutError(f"torchft run did not finish in {deadline_s} s; see {out}/log.txt")
            for r, p in list(workers.items()):
                if p.poll() == -signal.SIGKILL and not replaced:
                    replaced = True
                    if standby is not None:
                        standby.stdin.write(f"{r}\n".encode())  # type: ignore[union-attr]
                        standby.stdin.flush()  # type: ignore[union-attr]
                        workers[r] = standby
                    else:
                        workers[r] = start(r, True)
                        procs.append(workers[r])
            time.sleep(0.01)
        bad = {r: p.returncode for r, p in workers.items() if p.returncode != 0}
        if bad:
            raise RuntimeError(f"torchft workers failed {bad}; see {out}/log.txt")
    finally:
        _stop(procs + [lighthouse])
        log.close()


def _free_port_pair() -> int:
    """A port p with p and p+1 free now (nvrx's store on p, the training store on p+1)."""
    for _ in range(50):
        p = free_port()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two adjacent free ports found")


# The gloo collective timeout the nvrx ranks' process group gets. On gloo it, not the
# library, decides how long a survivor blocked in an all-reduce with the dead rank waits
# (nvrx_worker.py says why). torch's default (30 min) would make one run last half an
# hour, so "default" uses 60 s; tuned uses 20 s, the shortest that never fired on a
# healthy step of this model on the loaded 2-core machine.
NVRX_GLOO_TIMEOUT_S = {"default": 60.0, "tuned": 20.0}


def run_nvrx(venv: Path, out: Path, *, steps: int, kill_step: int, tuned: bool,
             deadline_s: float = 900) -> None:
    """Five ranks (four active, one spare) under inprocess.Wrapper; rank 1 kills itself."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port_pair()
    log = open(out / "log.txt", "w")
    procs = []
    for rank in range(WORLD + 1):
        env = _env(out, RANK=str(rank), WORLD_SIZE=str(WORLD + 1), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        cmd = [str(venv / "bin" / "python"), str(HERE / "nvrx_worker.py"), "--steps", str(steps),
               "--kill-step", str(kill_step), "--gloo-timeout-s",
               str(NVRX_GLOO_TIMEOUT_S["tuned" if tuned else "default"])] + (
                   ["--tuned"] if tuned else [])
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    t_end = time.time() + deadline_s
    finished_at = None
    try:
        while any(p.poll() is None for p in procs):
            if time.time() > t_end:
                raise TimeoutError(f"nvrx run did not finish in {deadline_s} s; see {out}/log.txt")
            # After a kill the store-hosting rank waits in the Wrapper's termination barrier
            # for the dead rank (measured: about 100 s). Once the four active ranks wrote their
            # final state there is nothing left to measure: 10 s grace, then stop them.
            if finished_at is None and sum(e["event"] == "final" for e in read_timelines(out)) >= WORLD:
                finished_at = time.time()
            if finished_at is not None and time.time() - finished_at > 10:
                _stop(procs)
                return
            time.sleep(0.05)
        bad = {r: p.returncode for r, p in enumerate(procs)
               if p.returncode != 0 and not (r == 1 and kill_step >= 0)}
        if bad:
            raise RuntimeError(f"nvrx ranks failed {bad}; see {out}/log.txt")
    finally:
        _stop(procs)
        log.close()
