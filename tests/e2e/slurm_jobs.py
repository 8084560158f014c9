"""Jobs on the single-node Slurm of this machine (scripts/slurm/local_cluster.sh), for
test_slurm.py and test_slurm_entries.py: is Slurm up, one `sbatch --wait` of
scripts/slurm/pretrain.sbatch in the background, and the processes a job runs here."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest

from conftest import REPO, RunResult, _env

SBATCH = REPO / "scripts" / "slurm" / "pretrain.sbatch"
START = "bash scripts/slurm/local_cluster.sh start"


def slurm_up() -> bool:
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(state.rstrip("*~#") in ("idle", "mixed", "allocated")
               for state in out.split())


def require_slurm() -> None:
    """Skip unless slurmctld answers with a node up (checked when a test runs, not at
    collection: sinfo takes 9 s to give up)."""
    if not slurm_up():
        pytest.skip(f"no running Slurm (as root: {START})")


class Job:
    """One `sbatch --wait` of pretrain.sbatch, running in the background.

    ``env_extra``: the script's parameters (ENTRY, RECIPE, NCL_VENV, ...); ``args``: the
    overrides after the script's name; ``on_path``: a directory put first on PATH, where
    the script finds ``ncl-launch`` when no NCL_VENV/NCL_LAUNCH names one (an activated
    environment)."""

    def __init__(self, run_dir: Path, env_extra: dict[str, str], args: list[str],
                 on_path: Optional[Path] = None) -> None:
        self.run_dir = run_dir
        self.job_id = "slurm-e2e-" + secrets.token_hex(4)
        self.out = run_dir.parent / f"{run_dir.name}-slurm.out"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        env = _env()
        if on_path is not None:
            env["PATH"] = f"{on_path}:{env['PATH']}"
        env.update(NCL_REPO=str(REPO), NCL_JOB_ID=self.job_id, RUN_DIR=str(run_dir),
                   REPLACE_GRACE_S="1", **env_extra)
        cmd = ["sbatch", "--wait", "--parsable", "--nodes=1", f"--job-name={self.job_id}",
               f"--output={self.out}", f"--chdir={REPO}", str(SBATCH), *args]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)

    def wait(self, timeout: float = 600) -> RunResult:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            subprocess.run(["scancel", f"--name={self.job_id}"])
            self.proc.kill()
            raise
        self.seconds = time.monotonic() - self.started
        text = self.proc.stdout.read() + (self.out.read_text() if self.out.exists() else "")
        return RunResult(self.proc.returncode, text, self.run_dir)

    def wait_for_step(self, step: int, timeout: float = 300) -> None:
        path = self.run_dir / "metrics.jsonl"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and len(path.read_text().splitlines()) >= step:
                return
            assert self.proc.poll() is None, "the job ended early"
            time.sleep(0.2)
        raise TimeoutError(f"step {step} not reached")

    def agent_pid(self, node_rank: int) -> int:
        """The ncl-launch process of this job serving `node_rank` (found through /proc)."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if (any(a.endswith(b"ncl-launch") for a in argv[:2])
                    and b"--node-rank" in argv
                    and argv[argv.index(b"--node-rank") + 1] == str(node_rank).encode()
                    and f"NCL_JOB_ID={self.job_id}".encode() in environ):
                return int(entry.name)
        raise LookupError(f"no agent for node rank {node_rank} of {self.job_id}")


def kill_tree(pid: int) -> int:
    """SIGKILL a process and all its descendants at once, like a node losing power."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(tree)


def this_host() -> str:
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    socket.gethostbyname(host)  # the agents' store address must resolve
    return host


def slurm_job_id(name: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True,
                             text=True).stdout.split()
        if out:
            return out[0]
        time.sleep(0.5)
    raise TimeoutError(f"no job named {name}")
