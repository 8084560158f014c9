"""scripts/slurm/pretrain.sbatch on a real Slurm: a single-node cluster on this machine.

    bash scripts/slurm/local_cluster.sh start      # as root: installs and starts Slurm
    .venv/bin/python -m pytest -m slurm tests/e2e/test_slurm.py

Skipped unless `sbatch` is installed and slurmctld answers with a node up. The second test
runs two agents on the one Slurm node (NCL_HOSTS) with one spare "node", kills node rank 1
(its agent and every process under it) mid-run and checks that the supervisor starts its
replacement and that the run ends bit for bit equal to the fault-free one.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, RunResult, _env

SBATCH = REPO / "scripts" / "slurm" / "pretrain.sbatch"
STEPS = 6
OVERRIDES = ["checkpointless=tier4", "strategy.num_distributed_optimizer_instances=2",
             f"trainer.max_steps={STEPS}"]


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


pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


@pytest.fixture(scope="module", autouse=True)
def slurm():
    """Checked when a test runs, not at collection: sinfo takes 9 s to give up."""
    if not slurm_up():
        pytest.skip("no running Slurm (as root: bash scripts/slurm/local_cluster.sh start)")


class Job:
    """One `sbatch --wait` of the script, running in the background."""

    def __init__(self, run_dir: Path, env_extra: dict[str, str]) -> None:
        self.run_dir = run_dir
        self.job_id = "slurm-e2e-" + secrets.token_hex(4)
        self.out = run_dir.parent / f"{run_dir.name}-slurm.out"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        env = _env()
        env.update(NCL_REPO=str(REPO), RECIPE="tiny_gpt", NCL_JOB_ID=self.job_id,
                   REPLACE_GRACE_S="1", **env_extra)
        cmd = ["sbatch", "--wait", "--parsable", "--nodes=1", f"--job-name={self.job_id}",
               f"--output={self.out}",
               f"--chdir={REPO}", str(SBATCH), *OVERRIDES, f"hydra.run.dir={run_dir}"]
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


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory):
    """1 node x 4 ranks, no fault: the run the issue asks for, and the reference."""
    job = Job(tmp_path_factory.mktemp("slurm-ref") / "run",
              {"NPROC_PER_NODE": "4", "SPARES": "1"})
    result = job.wait()
    result.seconds = job.seconds
    return result


def test_sbatch_runs_tiny_gpt_on_one_node(reference):
    reference.check()
    assert [r["step"] for r in reference.metrics] == list(range(1, STEPS + 1))
    assert len(reference.summary["state_sha256"]) == 64
    assert "job finished: every node rank completed" in reference.output
    print(f"sbatch --wait, 1 node x 4 ranks, {STEPS} steps: {reference.seconds:.1f} s")


def test_killed_node_is_replaced_from_the_spare_and_the_run_is_exact(reference, tmp_path):
    reference.check()
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    socket.gethostbyname(host)  # the agents' store address must resolve
    job = Job(tmp_path / "run", {"NCL_HOSTS": f"{host},{host},{host}", "SPARE_NODES": "1",
                                 "NPROC_PER_NODE": "2", "SPARES": "1"})
    job.wait_for_step(2)
    assert kill_tree(job.agent_pid(1)) >= 3  # agent, 2 ranks (and its warm spare)
    result = job.wait().check()
    assert "node rank 1: replacement 1 of 4 on" in result.output
    assert [r["loss_hex"] for r in result.metrics] == [r["loss_hex"] for r in reference.metrics]
    assert result.summary["state_sha256"] == reference.summary["state_sha256"]
    assert len(result.summary["recoveries"]) >= 1
