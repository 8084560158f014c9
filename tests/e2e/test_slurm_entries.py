"""The NeMo 2 and Megatron-Bridge front-ends through a real Slurm (make test-slurm-entries).

On the single-node Slurm of this machine (scripts/slurm/local_cluster.sh, job accounting
on), each job loses a rank to the fault plan and ends bit for bit where the same job
without the fault ends (every step's ``loss_hex``, the ``state_sha256``); each test checks
that the fault fired and that one recovery happened:

* ``sbatch scripts/slurm/pretrain.sbatch`` with ENTRY=nemo (NeMo's tiny_llama recipe,
  recipes/nemo_pretrain.py) in the NeMo environment and with ENTRY=bridge (Bridge's
  tiny_llama, recipes/bridge_pretrain.py) in the latest one;
* NeMo-Run's own ``SlurmExecutor`` (``LocalTunnel``, ``NclLaunch``) submitting a recipe
  object with ``run.run`` and following it with ``sacct`` (tests/e2e/scripts/nemo_run_slurm.py).

The script picks no environment by itself: NCL_VENV names the one whose ``ncl-launch`` the
agents run, here the venvs given as NCL_TEST_VENV_NEMO and NCL_TEST_VENV_LATEST (the
Makefile passes .venv-nemo and .venv-latest). The fault-free references run the same
command lines with ``ncl-launch`` of the same venv, outside Slurm.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, RunResult, _env, free_port
from slurm_jobs import Job, require_slurm

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

STEPS = 8
NEMO_ARGS = [f"trainer.max_steps={STEPS}", "trainer.devices=2"]
BRIDGE_ARGS = ["checkpointless=tier4", f"train.train_iters={STEPS}"]


def venv(variable: str, make_target: str) -> Path:
    path = os.environ.get(variable)
    if not path:
        pytest.skip(f"{variable} is not set: name the environment to test (make "
                    f"test-slurm-entries passes it; it needs {make_target})")
    path = Path(path).absolute()
    if not (path / "bin" / "ncl-launch").is_file():
        pytest.fail(f"{variable}={path} has no bin/ncl-launch: build it with {make_target}")
    return path


@pytest.fixture(scope="module", autouse=True)
def slurm():
    require_slurm()


@pytest.fixture(scope="module")
def nemo_venv():
    return venv("NCL_TEST_VENV_NEMO", "make venv-nemo")


@pytest.fixture(scope="module")
def latest_venv():
    return venv("NCL_TEST_VENV_LATEST", "make venv-latest")


def nemo_env() -> dict[str, str]:
    # NeMo's set-up is slow on 2 shared cores: a silent rank is not hung
    return {"NCL_FORCE_CPU": "1", "NCL_HANG_TIMEOUT_S": "30"}


def bridge_env() -> dict[str, str]:
    return {"NCL_FORCE_CPU": "1", "NCL_HANG_TIMEOUT_S": "60", "HF_HUB_OFFLINE": "1"}


def ncl_launch(venv: Path, script_args: list[str], run_dir: Path, env_extra: dict[str, str],
               timeout: float = 600) -> RunResult:
    """One agent, 2 ranks, no spare: the fault-free run, outside Slurm."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = dict(_env(), **env_extra)
    cmd = [str(venv / "bin" / "ncl-launch"), "--nproc-per-node", "2", "--spares", "0",
           "--master-port", str(free_port()), *script_args]
    started = time.monotonic()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    result = RunResult(out.returncode, out.stdout + out.stderr, run_dir)
    result.seconds = time.monotonic() - started
    return result.check()


def events(run_dir: Path) -> list[dict]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def assert_recovered_exactly(got: RunResult, want: RunResult, fault: tuple) -> None:
    """The fault fired once, one recovery, and every row and the state as without it."""
    fired = [(e["fault_rank"], e["step"], e["phase"], e["kind"]) for e in events(got.run_dir)
             if e["event"] == "fault"]
    assert fired == [fault], got.output[-6000:]
    assert len(got.summary["recoveries"]) == 1
    assert want.summary["recoveries"] == []
    assert [r["step"] for r in got.metrics] == list(range(1, STEPS + 1))
    assert [r["loss_hex"] for r in got.metrics] == [r["loss_hex"] for r in want.metrics]
    assert got.summary["state_sha256"] == want.summary["state_sha256"]


def plan(rank: int, step: int, phase: str) -> str:
    return f"fault.plan=[{{rank:{rank},step:{step},phase:{phase},kind:kill}}]"


@pytest.fixture(scope="module")
def nemo_reference(nemo_venv, tmp_path_factory):
    from nemo_checkpointless.nemo.launch_env import AGENT_ENV

    run_dir = tmp_path_factory.mktemp("nemo-ref") / "run"
    args = [str(REPO / "recipes" / "nemo_pretrain.py"), "recipe=tiny_llama",
            f"run_dir={run_dir}", f"log.log_dir={run_dir}/log", *NEMO_ARGS]
    result = ncl_launch(nemo_venv, args, run_dir, dict(nemo_env(), **AGENT_ENV))
    print(f"NeMo reference (ncl-launch, no Slurm): {result.seconds:.0f} s")
    return result


def test_sbatch_nemo_entry_recovers_a_killed_rank_exactly(nemo_venv, nemo_reference,
                                                          tmp_path):
    """ENTRY=nemo: recipes/nemo_pretrain.py under the batch script's agent step, its
    ranks forked from a zygote that imported NeMo (scripts/slurm/nemo.env)."""
    run_dir = tmp_path / "run"
    job = Job(run_dir, {"ENTRY": "nemo", "NCL_VENV": str(nemo_venv), "NPROC_PER_NODE": "2",
                        "SPARES": "1", **nemo_env()},
              [*NEMO_ARGS, f"log.log_dir={run_dir}/log", plan(1, 3, "optimizer")])
    result = job.wait().check()
    out = result.output
    assert "nemo entry, recipe tiny_llama" in out
    assert f"agent: {nemo_venv}/bin/ncl-launch" in out
    assert re.search(r"environment from files: \S*NCL_ZYGOTE_PRELOAD", out)
    assert "started rank 0 (pid" in out and "forked from the zygote" in out
    assert "warm spare takes rank 1" in out
    assert "job finished: every node rank completed" in out
    assert_recovered_exactly(result, nemo_reference, (1, 3, "optimizer", "kill"))
    print(f"sbatch ENTRY=nemo, 1 node x 2 ranks + 1 spare, rank 1 killed: {job.seconds:.0f} s")


def test_nemo_run_slurm_executor_recovers_a_killed_rank_exactly(nemo_venv, nemo_reference,
                                                                tmp_path):
    """NeMo-Run's SlurmExecutor with NclLaunch: NeMo-Run writes and submits the batch
    script (sbatch through a LocalTunnel) and waits on the job with sacct. Rank 0 (it
    writes NeMo's logs) is killed in step 3, before the first checkpoint save: a rank killed
    after one leaves megatron's checkpoint-writer process (a multiprocessing Manager)
    behind, which holds the step's output open, so Slurm ends the step only 60 s after the
    agent exits (docs/nemo.md, Slurm)."""
    run_dir = tmp_path / "run"
    # not ".../nemo_run": NeMo-Run's Slurm scheduler (0.11) replaces "/nemo_run" in its
    # paths (its directory inside containers) by the job's directory, outside them too
    home = tmp_path / "nemorun-home"
    env = dict(_env(), NEMORUN_HOME=str(home), **nemo_env())
    started = time.monotonic()
    out = subprocess.run([str(nemo_venv / "bin" / "python"),
                          str(REPO / "tests" / "e2e" / "scripts" / "nemo_run_slurm.py"),
                          str(run_dir), "--kill", "0:3:grad_sync", "--steps", str(STEPS)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=800,
                         stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    (job_dir,) = home.glob("experiments/tiny/tiny_*/tiny")
    logs = "".join(p.read_text() for p in sorted(job_dir.glob("*.out")))
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:] + logs[-6000:]
    job_id = re.search(r"Job (\d+) finished: SUCCEEDED", text)
    assert job_id, text[-4000:] + logs[-6000:]
    # NeMo-Run's own batch script, submitted to Slurm, and Slurm's record of it
    batch = (job_dir.parent / "tiny_sbatch.sh").read_text()
    assert "#SBATCH --ntasks-per-node=1" in batch and f"bash {job_dir}/scripts/tiny.sh" in batch
    node = (job_dir / "scripts" / "tiny.sh").read_text()
    assert f"exec {nemo_venv}/bin/python -m nemo_checkpointless.launch.agent" in node
    state = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id.group(1), "-o",
                            "State,ExitCode"], capture_output=True, text=True).stdout.split()
    assert state == ["COMPLETED|0:0"], state
    assert "warm spare takes rank 0" in logs
    result = RunResult(0, logs, run_dir)
    assert_recovered_exactly(result, nemo_reference, (0, 3, "grad_sync", "kill"))
    print(f"NeMo-Run SlurmExecutor, rank 0 killed: {seconds:.0f} s (run.run to its return)")


def test_sbatch_bridge_entry_recovers_a_killed_rank_exactly(latest_venv, tmp_path):
    """ENTRY=bridge: recipes/bridge_pretrain.py (Bridge's tiny_llama, tier 4) under the
    batch script's agent step, against ncl-launch of the same venv without Slurm."""
    ref_dir = tmp_path / "ref"
    reference = ncl_launch(latest_venv, [str(REPO / "recipes" / "bridge_pretrain.py"),
                                         "recipe=tiny_llama", *BRIDGE_ARGS,
                                         f"hydra.run.dir={ref_dir}"], ref_dir, bridge_env())
    run_dir = tmp_path / "run"
    job = Job(run_dir, {"ENTRY": "bridge", "RECIPE": "tiny_llama",
                        "NCL_VENV": str(latest_venv), "NPROC_PER_NODE": "2", "SPARES": "1",
                        **bridge_env()},
              [*BRIDGE_ARGS, plan(1, 3, "optimizer")])
    result = job.wait().check()
    out = result.output
    assert "bridge entry, recipe tiny_llama" in out
    assert f"agent: {latest_venv}/bin/ncl-launch" in out
    assert "warm spare takes rank 1" in out
    assert "job finished: every node rank completed" in out
    assert_recovered_exactly(result, reference, (1, 3, "optimizer", "kill"))
    print(f"Bridge reference (ncl-launch, no Slurm): {reference.seconds:.0f} s; sbatch "
          f"ENTRY=bridge, rank 1 killed: {job.seconds:.0f} s")
