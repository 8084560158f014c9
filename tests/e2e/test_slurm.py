"""scripts/slurm/pretrain.sbatch on a real Slurm: a single-node cluster on this machine.

    bash scripts/slurm/local_cluster.sh start      # as root: installs and starts Slurm
    .venv/bin/python -m pytest -m slurm tests/e2e/test_slurm.py

Skipped unless `sbatch` is installed and slurmctld answers with a node up. The fault-free
1 node x 4 ranks run through sbatch is the reference, itself checked bit for bit against
torchrun with the same recipe and layout. Then several agents share the one Slurm node
(NCL_HOSTS), each behaving as a node: node rank 1 (its agent and every process under it) is
killed mid-run and taken over by the standby agent of the spare "node" (or, without
standbys, restarted by the supervisor); each run ends bit for bit equal to the reference.
Last, the time-limit path on real Slurm (USR1 to the batch script, forwarded to every step,
`scontrol requeue`, the job running again as run 2) with a stand-in agent.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import RunResult, torchrun
from slurm_jobs import Job, kill_tree, require_slurm, slurm_job_id, this_host

STEPS = 6
OVERRIDES = ["checkpointless=tier4", "strategy.num_distributed_optimizer_instances=2",
             f"trainer.max_steps={STEPS}"]

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


@pytest.fixture(scope="module", autouse=True)
def slurm():
    require_slurm()


def lean_job(run_dir: Path, env_extra: dict[str, str]) -> Job:
    """tiny_gpt through the lean entry, ncl-launch from PATH, as in an activated
    environment (the script picks no venv by itself)."""
    return Job(run_dir, {"RECIPE": "tiny_gpt", **env_extra}, OVERRIDES,
               on_path=Path(sys.executable).parent)


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory):
    """1 node x 4 ranks, no fault: the run the issue asks for, and the reference."""
    job = lean_job(tmp_path_factory.mktemp("slurm-ref") / "run",
              {"NPROC_PER_NODE": "4", "SPARES": "1"})
    result = job.wait()
    result.seconds = job.seconds
    return result


def assert_exact(result: RunResult, reference: RunResult) -> None:
    assert [r["step"] for r in result.metrics] == list(range(1, STEPS + 1))
    assert [r["loss_hex"] for r in result.metrics] == [r["loss_hex"] for r in reference.metrics]
    assert result.summary["state_sha256"] == reference.summary["state_sha256"]



def test_sbatch_runs_tiny_gpt_on_one_node(reference):
    reference.check()
    assert [r["step"] for r in reference.metrics] == list(range(1, STEPS + 1))
    assert len(reference.summary["state_sha256"]) == 64
    assert "job finished: every node rank completed" in reference.output
    assert f"run dir {reference.run_dir}" in reference.output
    print(f"sbatch --wait, 1 node x 4 ranks, {STEPS} steps: {reference.seconds:.1f} s")


def test_slurm_run_equals_torchrun_of_the_same_recipe_and_layout(reference, tmp_path):
    """The agents under Slurm change nothing in what is computed (issue 19 point 8)."""
    reference.check()
    plain = torchrun(4, ["recipe=tiny_gpt", *OVERRIDES], tmp_path / "run", timeout=400).check()
    assert_exact(plain, reference)


def test_killed_node_is_taken_over_by_the_standby_and_the_run_is_exact(reference, tmp_path):
    """Two training "nodes" and one spare node running a standby agent, all on this host:
    node rank 1 loses its agent, ranks and warm spare at once; the standby (its processes
    already imported) notices the dead store server and takes the node over."""
    reference.check()
    host = this_host()
    job = lean_job(tmp_path / "run", {"NCL_HOSTS": f"{host},{host},{host}", "SPARE_NODES": "1",
                                 "NPROC_PER_NODE": "2", "SPARES": "1"})
    job.wait_for_step(2)
    killed_at = time.monotonic()
    assert kill_tree(job.agent_pid(1)) >= 3  # agent, 2 ranks (and its warm spare)
    result = job.wait().check()
    out = result.output
    assert f"node rank 1: taken over by the standby on {host} (replacement 1 of 4)" in out
    assert "node 1 lost: this standby takes it over" in out
    assert "node rank 1: replacement" not in out  # no scheduler restart
    assert "standby 1: agent on" in out  # the host of the lost node got a new standby
    # the new standby ends either way: it sees the job finish and leaves by itself, or the
    # supervisor (which polls) finds every node rank done first and ends it
    assert ("every node rank finished: ending the idle standby agents" in out
            or "standby on " + host + " exited (code 0)" in out), out[-3000:]
    assert_exact(result, reference)
    assert len(result.summary["recoveries"]) == 1
    print(f"standby takeover run: {job.seconds:.1f} s, "
          f"{time.monotonic() - killed_at:.1f} s from the kill to the job's end")


def test_killed_node_is_restarted_on_an_idle_spare_and_the_run_is_exact(reference, tmp_path):
    reference.check()
    host = this_host()
    job = lean_job(tmp_path / "run", {"NCL_HOSTS": f"{host},{host},{host}", "SPARE_NODES": "1",
                                 "STANDBY": "0", "NPROC_PER_NODE": "2", "SPARES": "1"})
    job.wait_for_step(2)
    assert kill_tree(job.agent_pid(1)) >= 3
    result = job.wait().check()
    assert "node rank 1: replacement 1 of 4 on" in result.output
    assert_exact(result, reference)
    assert len(result.summary["recoveries"]) == 1


FAKE_AGENT = """#!/usr/bin/env bash
# stand-in for ncl-launch, acting out what the agent is expected to do near a time limit:
# on SIGUSR1 checkpoint at the next step boundary and exit 143; run 2 resumes and finishes
node=standby run_dir="" prev=""
for arg in "$@"; do
    [[ $prev == --node-rank ]] && node=$arg
    case $arg in hydra.run.dir=*) run_dir=${arg#hydra.run.dir=} ;; esac
    prev=$arg
done
log=$run_dir/agents.log
echo "start node $node run ${SLURM_RESTART_COUNT:-0} job $NCL_JOB_ID" >>"$log"
trap 'echo "SIGUSR1 node $node run ${SLURM_RESTART_COUNT:-0}" >>"$log"; exit 143' USR1
trap 'echo "SIGTERM node $node" >>"$log"; exit 143' TERM
[[ $node == 0 ]] && echo '{"step": 1}' >>"$run_dir/metrics.jsonl"
if ((${SLURM_RESTART_COUNT:-0} > 0)); then
    sleep 1
    exit 0
fi
for ((i = 0; i < 1200; i++)); do sleep 0.1 & wait $!; done
exit 1
"""



def test_time_limit_signal_checkpoints_requeues_and_runs_again(tmp_path):
    """`#SBATCH --signal=B:USR1@...` as Slurm delivers it (to the batch shell only): the
    script passes SIGUSR1 to every agent step, each (a stand-in here) checkpoints and exits
    143, and the job requeues itself and runs again with the same RUN_DIR."""
    host = this_host()
    agent = tmp_path / "fake-ncl-launch"
    agent.write_text(FAKE_AGENT)
    agent.chmod(0o755)
    run_dir = tmp_path / "run"
    job = lean_job(run_dir, {"NCL_LAUNCH": str(agent), "NCL_HOSTS": f"{host},{host},{host}",
                        "SPARE_NODES": "1", "NPROC_PER_NODE": "1"})
    jid = slurm_job_id(job.job_id)
    log = run_dir / "agents.log"
    deadline = time.monotonic() + 120
    while not log.exists() or len(log.read_text().splitlines()) < 3:  # 2 agents, 1 standby
        assert time.monotonic() < deadline and job.proc.poll() is None
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True)
    # Slurm makes a requeued job eligible 2 minutes later; start it now
    deadline = time.monotonic() + 120
    while "run 1" not in log.read_text():
        state = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%T"], capture_output=True,
                               text=True).stdout.strip()
        if state == "PENDING":
            subprocess.run(["scontrol", "update", f"jobid={jid}", "starttime=now"])
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.5)
    result = job.wait(timeout=300)
    agents = log.read_text()
    assert result.returncode == 0, result.output[-4000:]
    assert sorted(l for l in agents.splitlines() if l.startswith("SIGUSR1")) == [
        "SIGUSR1 node 0 run 0", "SIGUSR1 node 1 run 0", "SIGUSR1 node standby run 0"]
    assert f"start node 0 run 1 job {job.job_id}.1" in agents  # run 2: its own job identity
    out = result.output
    assert "got SIGUSR1: every agent checkpoints at the next step boundary" in out
    assert f"requeueing job {jid} (run 2)" in out
    assert f"job {job.job_id}.1 (run 2)" in out and "job finished: every node rank completed" in out
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
