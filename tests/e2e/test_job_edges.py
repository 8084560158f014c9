"""Faults at the edges of a job, and a job chain that resumes from durable checkpoints.

Every run goes through ncl-launch and ends bit for bit equal to the fault-free run
(``state_sha256`` and every ``loss_hex``), with one metrics row per committed step.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from conftest import Agents, FaultFreeRuns, ncl_launch

pytestmark = [pytest.mark.timeout(900)]

STEPS = 8
PP2 = ["strategy.pipeline_model_parallel_size=2",
       "strategy.num_distributed_optimizer_instances=2"]
DP4 = ["strategy.num_distributed_optimizer_instances=2"]
BASE = ["checkpointless=tier4", f"trainer.max_steps={STEPS}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return FaultFreeRuns(tmp_path_factory, BASE, {"pp2": PP2, "dp4": DP4}, "edges")


def plan(*faults: tuple[int, int, str, str]) -> str:
    items = ",".join(f"{{rank:{r},step:{s},phase:{p},kind:{k}}}" for r, s, p, k in faults)
    return f"fault.plan=[{items}]"


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    if not path.exists():  # nothing happened
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def assert_exact(result, ref, faults=()) -> None:
    result.check()
    assert [r["step"] for r in result.metrics] == list(range(1, STEPS + 1))
    assert [r["loss_hex"] for r in result.metrics] == [r["loss_hex"] for r in ref.metrics]
    assert result.summary["state_sha256"] == ref.summary["state_sha256"]
    fired = sorted((e["fault_rank"], e["step"], e["phase"], e["kind"])
                   for e in events(result.run_dir) if e["event"] == "fault")
    assert fired == sorted(faults)


@pytest.mark.parametrize("kind", ["kill", "hang"])
def test_a_fault_in_the_last_step(kind, tmp_path, reference):
    """The issue's own reproduction: rank 3 dies after the last step's update, while the
    others are in the final state hash; the hash is redone with its replacement."""
    faults = [(3, STEPS, "after_step", kind)]
    result = ncl_launch(4, [*BASE, *PP2, plan(*faults)], tmp_path / "run")
    assert_exact(result, reference("pp2"), faults)
    assert len(result.summary["recoveries"]) == 1


@pytest.mark.parametrize("phase,step", [("startup", 1), ("finish", STEPS)])
def test_a_fault_during_set_up_or_the_final_summary(phase, step, tmp_path, reference):
    faults = [(2, step, phase, "kill")]
    result = ncl_launch(4, [*BASE, *DP4, plan(*faults)], tmp_path / "run")
    assert_exact(result, reference("dp4"), faults)


def test_a_fault_during_a_durable_save(tmp_path, reference):
    """Rank 1 dies while the save after step 3 is being written: that checkpoint stays
    incomplete (never loaded), the job recovers from peers, the next save completes."""
    faults = [(1, 3, "checkpoint", "kill")]
    result = ncl_launch(4, [*BASE, *DP4, "checkpoint.interval=3", plan(*faults)],
                        tmp_path / "run")
    assert_exact(result, reference("dp4"), faults)
    ckpts = result.run_dir / "checkpoints"
    assert (ckpts / "iter_0000006" / "ncl_manifest.json").exists()
    assert not (ckpts / "iter_0000003" / "ncl_manifest.json").exists()


def test_a_fault_while_the_job_shuts_down(tmp_path, reference):
    """After the job finished (every rank past the final barrier), a rank that dies while
    exiting is not replaced: the job is complete and its result stands."""
    faults = [(2, STEPS, "shutdown", "kill")]
    result = ncl_launch(4, [*BASE, *DP4, plan(*faults)], tmp_path / "run")
    assert_exact(result, reference("dp4"), faults)
    assert "replacing it" not in result.output


def kill_every_agent(agents: Agents) -> None:
    for proc in agents.procs.values():
        os.killpg(proc.pid, signal.SIGKILL)
    for proc in agents.procs.values():
        proc.wait()


def test_a_new_job_resumes_after_the_whole_job_died(tmp_path, reference):
    """Every agent SIGKILLed after step 5; the same command with the same run directory
    continues from the checkpoint of step 4 (the newest one, step 6 not reached; with
    the step-4 checkpoint corrupted it would use step 2): one metrics row per step across
    both jobs, and the end equals an uninterrupted run bit for bit."""
    run_dir = tmp_path / "run"
    overrides = [*BASE, *DP4, "checkpoint.interval=2", "checkpoint.keep=3"]
    first = Agents(2, 2, overrides, run_dir)
    first.start(0)
    first.start(1)
    first.wait_for_step(5, timeout=300)
    kill_every_agent(first)
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()
            if l.strip()]
    assert rows[-1]["step"] >= 5
    second = Agents(2, 2, overrides, run_dir)
    second.start(0)
    second.start(1)
    result = second.wait(timeout=400)
    assert_exact(result, reference("dp4"))
    assert "resumed at step" in result.output


def test_a_corrupt_newest_checkpoint_is_skipped_on_resume(tmp_path, reference):
    """The same job started again over a run directory whose newest checkpoint (step 8)
    has a flipped byte: the warning names it, the job resumes from step 6 and redoes steps
    7 and 8 exactly (the metrics rows of 7 and 8 are dropped and written again)."""
    run_dir = tmp_path / "run"
    overrides = [*BASE, *DP4, "checkpoint.interval=2", "checkpoint.keep=3"]
    ncl_launch(4, overrides, run_dir, spares=0).check()
    newest = run_dir / "checkpoints" / f"iter_{STEPS:07d}"
    assert (newest / "ncl_manifest.json").exists()
    victim = next(p for p in sorted(newest.rglob("*.distcp")))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = ncl_launch(4, overrides, run_dir, spares=0)
    assert_exact(result, reference("dp4"))
    assert f"iter_{STEPS:07d} fails verification" in result.output
    assert f"resumed at step {STEPS - 2}" in result.output


@pytest.mark.parametrize("tier,sig", [("tier4", signal.SIGTERM), ("off", signal.SIGUSR1)])
def test_a_stop_signal_checkpoints_and_the_next_job_continues(tier, sig, tmp_path, reference):
    """SIGTERM (Kubernetes, scancel) or SIGUSR1 (a Slurm time limit) to the agent: every
    rank finishes the step they agree on, a durable checkpoint of it is written, and the
    agent exits 143; the same command then continues from there, exactly."""
    run_dir = tmp_path / "run"
    overrides = [f"checkpointless={tier}", f"trainer.max_steps={STEPS}", *DP4]
    first = Agents(1, 4, overrides, run_dir)
    proc = first.start(0)
    first.wait_for_step(3, timeout=300)
    proc.send_signal(sig)
    stopped = first.wait(timeout=300)
    assert stopped.returncode == 143, stopped.output[-4000:]
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert 3 <= last < STEPS
    assert (run_dir / "checkpoints" / f"iter_{last:07d}" / "ncl_manifest.json").exists()
    assert f"stopped after step {last} as asked" in stopped.output
    second = Agents(1, 4, overrides, run_dir)
    second.start(0)
    result = second.wait(timeout=400)
    assert_exact(result, reference("dp4"))
    assert f"resumed at step {last}" in result.output


def test_a_rank_whose_replacements_keep_failing_at_start_up_stops_the_job(tmp_path):
    """Rank 3 is killed in step 3; every process that takes its place then fails in its
    recovery, before completing a step (five such faults are planned). After
    --max-start-failures (default 3) of them in a row, node 1's agent stops the job with
    exit code 3 and a message naming the rank, each process's end and its log, instead of
    replacing it for ever; node 0's agent follows with the same code. Ranks 0-2 died with
    steps in between and are never limited (they are not named)."""
    start_up = [(3, 2, "recovery", "exception")] * 5
    agents = Agents(2, 2, [*BASE, *DP4, plan((3, 3, "forward", "kill"), *start_up)],
                    tmp_path / "run", spares=1)
    for node in (0, 1):
        agents.start(node)
    t0 = time.monotonic()
    result = agents.wait(timeout=300)
    elapsed = time.monotonic() - t0
    codes = {node: proc.returncode for node, proc in agents.procs.items()}
    assert codes == {0: 3, 1: 3}, result.output[-6000:]
    fired = [(e["fault_rank"], e["step"], e["phase"], e["kind"])
             for e in events(result.run_dir) if e["event"] == "fault"]
    assert sorted(fired) == sorted([(3, 3, "forward", "kill"), *start_up[:3]])
    node1 = agents.logs[1].read_text()
    stop = re.search(r"rank 3 failed 3 times in a row before completing a step \(pid \d+: "
                     r"exit code 1; pid \d+: exit code 1; pid \d+: exit code 1\): not starting "
                     r"another process for it \(--max-start-failures 3\)\. Its output is in "
                     r"this agent's log \((.+?)\).*: stopping the job \(exit code 3\)", node1)
    assert stop, node1[-6000:]
    assert Path(stop.group(1)) == agents.logs[1].resolve()
    assert "(2 of --max-start-failures 3 in a row before a step)" in node1
    assert re.search(r"\[agent 0\] ERROR: the job was stopped by node 1 \(agent:\S+\): rank 3 "
                     "failed 3 times", result.output), result.output[-6000:]
    # three recoveries' worth of start-ups, not minutes of them
    assert elapsed < 150, elapsed
