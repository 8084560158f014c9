"""Checkpointless recovery end to end, through the real launcher and the real job.

Every test ends by comparing the recovered run with the same configuration run without
faults: ``state_sha256`` and every ``loss_hex`` line must be equal, bit for bit.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from conftest import Agents, FaultFreeRuns, ncl_launch, torchrun
from job_processes import free_port

pytestmark = [pytest.mark.timeout(600)]

STEPS = 8
LAYOUTS = {
    "tp2": ["strategy.tensor_model_parallel_size=2",
            "strategy.num_distributed_optimizer_instances=2"],
    "pp2": ["strategy.pipeline_model_parallel_size=2",
            "strategy.num_distributed_optimizer_instances=2"],
    "dp4": ["strategy.num_distributed_optimizer_instances=2"],
}
BASE = ["checkpointless=tier4", f"trainer.max_steps={STEPS}"]


def plan(*faults: tuple[int, int, str, str]) -> str:
    items = ",".join(f"{{rank:{r},step:{s},phase:{p},kind:{k}}}" for r, s, p, k in faults)
    return f"fault.plan=[{items}]"


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """Fault-free runs of each layout (computed once per session)."""
    return FaultFreeRuns(tmp_path_factory, BASE, LAYOUTS, "ref")


def assert_exact(result, ref) -> None:
    result.check()
    got, want = result.metrics, ref.metrics
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), "one line per committed step"
    assert [r["loss_hex"] for r in got] == [r["loss_hex"] for r in want]
    assert [r["consumed_samples"] for r in got] == [r["consumed_samples"] for r in want]
    assert result.summary["state_sha256"] == ref.summary["state_sha256"]


def events(result) -> list[dict]:
    path = Path(result.run_dir) / "events.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def assert_fired(result, faults: list[tuple[int, int, str, str]]) -> None:
    """Every planned fault fired, once, on its rank at its step and phase."""
    fired = sorted((e["fault_rank"], e["step"], e["phase"], e["kind"])
                   for e in events(result) if e["event"] == "fault")
    assert fired == sorted(faults)


@pytest.mark.parametrize("layout,faults", [
    ("dp4", [(1, 3, "optimizer", "kill"), (2, 6, "data", "exception")]),
    ("tp2", [(3, 3, "forward", "segfault"), (1, 6, "backward", "hang")]),
    ("pp2", [(2, 2, "grad_sync", "kill"), (0, 4, "param_sync", "exception"),
             (3, 6, "after_step", "kill")]),
])
def test_every_phase_and_kind_recovers_exactly(layout, faults, tmp_path, reference):
    result = ncl_launch(4, [*BASE, *LAYOUTS[layout], plan(*faults)], tmp_path / "run")
    assert_exact(result, reference(layout))
    summary = result.summary
    assert len(summary["recoveries"]) == len(faults)
    for rec in summary["recoveries"]:
        assert rec["bytes_transferred"] > 0
        assert set(rec["phases"]) >= {"rendezvous", "group_rebuild",
                                      "state_transfer", "first_step"}
        assert rec["total_s"] > 0
    assert_fired(result, faults)


def test_rank0_killed(tmp_path, reference):
    faults = [(0, 4, "forward", "kill")]
    result = ncl_launch(4, [*BASE, *LAYOUTS["dp4"], plan(*faults)], tmp_path / "run")
    assert_exact(result, reference("dp4"))
    assert_fired(result, faults)
    assert len(result.summary["recoveries"]) == 1
    # events.jsonl says which process held each rank: four at start, rank 0's replacement
    procs = [e for e in events(result) if e["event"] == "rank_process"]
    assert sorted(e["rank"] for e in procs if not e["replacement"]) == [0, 1, 2, 3]
    replaced = [e for e in procs if e["replacement"]]
    assert [(e["rank"], e["generation"]) for e in replaced] == [(0, 1)]
    assert len({e["pid"] for e in procs}) == 5
    # the recovery's timeline is logged inline, phase by phase
    assert re.search(r"recovered in \d+\.\d+s \(generation 1\)\n(  \w+ +\d+\.\d+ s.*\n)+",
                     result.output), result.output[-4000:]
    assert "  state_transfer" in result.output
    # DP only: every rank has the same model, so the warm spare built its model and DDP
    # before it was given rank 0 (zero-filled, rebound to the real groups, then filled)
    assert "model and DDP built before this rank was assigned" in result.output
    # the survivors' aborted groups (and their gloo threads) go once the new world has stepped
    assert re.search(r"\[rank [123]\] \S+ INFO: destroyed \d+ groups parked by the last "
                     r"recovery", result.output), result.output[-4000:]


def test_two_ranks_of_different_replica_sets_in_the_same_step(tmp_path, reference):
    # DP=4, 2 instances: ranks 0 and 1 hold different shards; 2 and 3 are their replicas
    faults = [(0, 5, "backward", "kill"), (1, 5, "backward", "kill")]
    result = ncl_launch(4, [*BASE, *LAYOUTS["dp4"], plan(*faults)], tmp_path / "run",
                        spares=2)
    assert_exact(result, reference("dp4"))
    assert_fired(result, faults)
    # one recovery when both die before either is told of the other's death; two when the
    # second rank is interrupted before its backward and fires in the redone step 5
    assert len(result.summary["recoveries"]) in (1, 2)


def test_killed_data_loader_rank_is_replaced_and_its_readers_stay_exact(tmp_path, reference):
    # TP=2 with the data cache: rank 2 loads the batches of its TP pair (2, 3) and rank 3
    # reads them from /dev/shm. The loader dies while fetching a step; its replacement
    # takes the loader role back at the same consumed_samples. Every step also checks that
    # both TP ranks got the same batch (Trainer._batch_hash), so a reader out of step with
    # the loader would stop the run.
    result = ncl_launch(4, [*BASE, *LAYOUTS["tp2"], plan((2, 4, "data", "kill"))],
                        tmp_path / "run")
    assert_exact(result, reference("tp2"))
    assert [r["batch_hash"] for r in result.metrics] == \
        [r["batch_hash"] for r in reference("tp2").metrics]
    assert_fired(result, [(2, 4, "data", "kill")])
    assert len(result.summary["recoveries"]) == 1
    assert "built before this rank was assigned" not in result.output  # TP=2: rank-specific


def test_second_failure_during_recovery(tmp_path, reference):
    faults = [(1, 3, "optimizer", "kill"), (2, 3, "recovery", "kill")]
    result = ncl_launch(4, [*BASE, *LAYOUTS["tp2"], plan(*faults)], tmp_path / "run",
                        spares=2)
    assert_exact(result, reference("tp2"))
    assert_fired(result, faults)
    assert len(result.summary["recoveries"]) == 1  # the second failure is inside the first


DECLARED = re.compile(r"\[agent 0\] WARNING: node 1 lost: its store server unreachable for "
                      r"([\d.]+)s; declared by the peer watch of agent:\S+ at generation (\d+)")


def wait_for_log(agents: Agents, pattern: re.Pattern, timeout: float = 60) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for log in agents.logs:
            found = pattern.search(log.read_text()) if log.exists() else None
            if found:
                return found
        time.sleep(0.1)
    tails = "\n".join(f"--- {log.name} (agent lines, last 40)\n" + "\n".join(
        [line for line in log.read_text().splitlines() if "[agent" in line][-40:])
        for log in agents.logs if log.exists())
    raise TimeoutError(f"{pattern.pattern!r} not in the agents' logs after {timeout:.0f} s:\n"
                       f"{tails}\n--- every log, last 4000 characters\n"
                       f"{agents.output()[-4000:]}")


def test_the_benchmarks_transfer_calibration_reaches_the_recovery_record(tmp_path, reference):
    """``NCL_TRANSFER_CALIBRATE=1`` (scripts/bench/recovery_time.py) measures a raw send right
    after the state transfer; the recovery's record carries it (it once did not: the
    measurement was set on the loop after the reconciler had taken its copy)."""
    faults = [(1, 3, "optimizer", "kill")]
    result = ncl_launch(4, [*BASE, *LAYOUTS["dp4"], plan(*faults)], tmp_path / "run",
                        env={"NCL_TRANSFER_CALIBRATE": "1"})
    assert_exact(result, reference("dp4"))
    assert_fired(result, faults)
    (transfer,) = [e for e in events(result) if e.get("phase") == "state_transfer"]
    assert transfer["bytes"] > 0 and transfer["raw_send_mb_per_s"] > 0, transfer


def test_whole_node_lost_and_replaced(tmp_path, reference):
    """Node 1 dies whole. Agent 0's peer watch finds its store server gone and declares
    node 1's ranks lost (launch/peers.py) before anything replaces the node; only then
    does the scheduler's stand-in start the replacement agent."""
    agents = Agents(2, 2, [*BASE, *LAYOUTS["dp4"]], tmp_path / "run")
    agents.start(0)
    agents.start(1)
    agents.wait_for_step(3)
    killed_at = time.monotonic()
    agents.kill_node(1)          # agent 1 and its ranks 2, 3: gone
    declared = wait_for_log(agents, DECLARED)
    assert 1.0 <= float(declared.group(1)) < 5.0  # --lost-after 1 s, probed 5x a second
    assert time.monotonic() - killed_at < 20.0
    agents.start(1)              # the scheduler's replacement node, only now
    result = agents.wait(timeout=400)
    assert_exact(result, reference("dp4"))
    gen = int(declared.group(2))
    assert re.search(rf"node 1 rejoins the job as a replacement at generation {gen + 1}\b",
                     result.output), result.output[-4000:]
    assert len(DECLARED.findall(result.output)) == 1  # one declaration for this loss
    assert len(result.summary["recoveries"]) == 1


def test_node0_lost_and_replaced_on_another_host(tmp_path, reference):
    """Node rank 0 (its agent serves a store shard; it holds rank 0) dies; the replacement
    node comes up on another host and port. Survivors find its store shard through the
    endpoint it publishes, and the run ends as if nothing happened."""
    agents = Agents(2, 2, [*BASE, *LAYOUTS["dp4"]], tmp_path / "run")
    agents.start(0)
    agents.start(1)
    agents.wait_for_step(3)
    agents.kill_node(0)
    agents.start(0, host="127.0.0.2")
    result = agents.wait(timeout=400)
    assert_exact(result, reference("dp4"))
    assert "rejoins the job as a replacement" in result.output
    assert "store server 0 moved from" in result.output
    assert len(result.summary["recoveries"]) == 1


def test_standby_node_takes_over_a_lost_node(tmp_path, reference):
    """A warm standby node (its processes already imported) notices node 1's store server
    gone, claims node 1, serves its store shard from another address and hands ranks 2-3
    to its warm processes: no scheduler, no cold start."""
    agents = Agents(2, 2, [*BASE, *LAYOUTS["dp4"]], tmp_path / "run")
    agents.start(0)
    agents.start(1)
    agents.start_standby()
    agents.wait_for_step(3)
    agents.kill_node(1)
    result = agents.wait(timeout=400)
    assert_exact(result, reference("dp4"))
    assert "node 1 lost: this standby takes it over" in result.output
    (rec,) = result.summary["recoveries"]
    assert rec["bytes_transferred"] > 0


@pytest.mark.parametrize("peer_list", ["current", "first"])
def test_standby_takes_a_node_over_then_node0_is_lost_and_replaced(tmp_path, reference,
                                                                    peer_list):
    """Two node losses in a row (the goodput chaos run's seed 1, 2026-12-03): node 1 dies
    and the standby takes it over (its store shard moves to the standby's address); once
    the job has stepped again, node 0, which serves shard 0, dies too, and its replacement
    starts. Its own server is empty. ``current``: the scheduler passes the peer list as it
    is now (shard 1 at the standby: ``scripts/slurm/supervise.sh``); ``first``: the job's
    first peer list (a Kubernetes pod restarted with its manifest's NCL_PEERS), and every
    agent knows the standbys' addresses (``--standby-peers``), through which the
    replacement finds the job. Both recover in process, exactly."""
    port = free_port()
    standby = f"127.0.0.3:{port}"
    options = ("--standby-peers", standby) if peer_list == "first" else ()
    agents = Agents(2, 2, [*BASE, *LAYOUTS["dp4"]], tmp_path / "run")
    agents.start(0, options=options)
    agents.start(1, options=options)
    agents.start_standby(port, options=options)
    agents.wait_for_step(3)
    agents.kill_node(1)
    wait_for_log(agents, re.compile(r"node 1 lost: this standby takes it over"))
    agents.wait_for_step(5)  # the standby's ranks hold node 1's state again
    agents.kill_node(0)
    if peer_list == "current":
        agents.start(0, peers=f"{agents.peers.split(',')[0]},{standby}")
    else:
        agents.start(0, options=options)
    result = agents.wait(timeout=400)
    assert_exact(result, reference("dp4"))
    assert "node 0 rejoins the job as a replacement" in result.output, result.output[-4000:]
    assert len(result.summary["recoveries"]) == 2


def test_every_replica_lost_fails_clearly_and_corrupts_nothing(tmp_path, reference):
    # ranks 0 and 2 hold the same optimizer shard (DP=4, 2 instances): both die at once
    faults = [(0, 4, "forward", "kill"), (2, 4, "forward", "kill")]
    result = ncl_launch(4, [*BASE, *LAYOUTS["dp4"], plan(*faults)], tmp_path / "run",
                        spares=2, env={"NCL_RECOVERY_TIMEOUT_S": "60"})
    assert result.returncode != 0
    assert_fired(result, faults)
    assert "no healthy rank holds a replica" in result.output
    assert "checkpointless.fallback=disk" in result.output
    rows = result.metrics
    ref = reference("dp4").metrics
    assert [r["loss_hex"] for r in rows] == [r["loss_hex"] for r in ref[:len(rows)]]
    assert not (result.run_dir / "summary.json").exists()


def test_every_replica_lost_with_disk_fallback_is_exact(tmp_path, reference):
    faults = [(0, 7, "forward", "kill"), (2, 7, "forward", "kill")]
    result = ncl_launch(4, [*BASE, *LAYOUTS["dp4"], "checkpointless.fallback=disk",
                            "checkpoint.interval=3", plan(*faults)],
                        tmp_path / "run", spares=2)
    assert_exact(result, reference("dp4"))
    assert_fired(result, faults)
    (rec,) = result.summary["recoveries"]
    # step 6's parts of the dead ranks may not have landed (asynchronous): then step 3
    assert rec["checkpoint_step"] in (3, 6) and rec["bytes_loaded"] > 0


def test_tier3_rolls_every_rank_back_to_the_disk_checkpoint(tmp_path, reference):
    result = ncl_launch(4, ["checkpointless=tier3", f"trainer.max_steps={STEPS}",
                            *LAYOUTS["dp4"], "checkpoint.interval=3",
                            plan((1, 5, "backward", "kill"))], tmp_path / "run")
    assert_exact(result, reference("dp4"))
    assert_fired(result, [(1, 5, "backward", "kill")])
    (rec,) = result.summary["recoveries"]
    assert rec["checkpoint_step"] == 3


def test_plan_naming_missing_rank_or_phase_is_refused(tmp_path):
    bad_rank = ncl_launch(4, [*BASE, plan((7, 3, "forward", "kill"))], tmp_path / "a",
                          spares=0, timeout=120)
    assert bad_rank.returncode != 0
    assert "rank 7 does not exist" in bad_rank.output
    bad_phase = ncl_launch(4, [*BASE, plan((1, 3, "warmup", "kill"))], tmp_path / "b",
                           spares=0, timeout=120)
    assert bad_phase.returncode != 0
    assert "phase 'warmup' does not exist" in bad_phase.output


def test_preflight_names_unprotected_ranks(tmp_path):
    """One optimizer instance: every rank's shard is unique; say so before training."""
    result = ncl_launch(4, ["checkpointless=tier4", "trainer.max_steps=2"], tmp_path / "run",
                        spares=0).check()
    assert "ranks [0, 1, 2, 3] hold optimizer shards with no replica" in result.output
    assert "num_distributed_optimizer_instances=2" in result.output
    assert any(e["event"] == "preflight" and e["unprotected_ranks"] == [0, 1, 2, 3]
               for e in events(result))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_commit_barrier_changes_nothing(layout, tmp_path, reference):
    """Each layout's tier-4 reference equals stock torchrun without recovery, bit for bit
    (the references every recovery test compares against are themselves checked)."""
    plain = torchrun(4, [f"trainer.max_steps={STEPS}", *LAYOUTS[layout]],
                     tmp_path / "run").check()
    ref = reference(layout)
    assert plain.summary["state_sha256"] == ref.summary["state_sha256"]
    assert [r["loss_hex"] for r in plain.metrics] == [r["loss_hex"] for r in ref.metrics]


def test_tiers_without_recovery_under_ncl_launch(tmp_path, reference):
    """``checkpointless=off`` under the agent trains exactly like torchrun (the overhead
    benchmark separates the launcher's own cost this way)."""
    base = ["checkpointless=off", f"trainer.max_steps={STEPS}", *LAYOUTS["dp4"]]
    # a short hang timeout: ranks without recovery still send heartbeats while they work
    result = ncl_launch(4, base, tmp_path / "off", env={"NCL_HANG_TIMEOUT_S": "1.5"}).check()
    plain = torchrun(4, base, tmp_path / "torchrun").check()
    assert result.summary["state_sha256"] == plain.summary["state_sha256"]
    assert [r["loss_hex"] for r in result.metrics] == [r["loss_hex"] for r in plain.metrics]


def test_progress_line_and_non_finite_loss_under_ncl_launch(tmp_path):
    """The recovery loop reports progress like the plain loop, and a NaN loss stops the
    job (exit 3, every rank's verdict) instead of training on or replacing ranks."""
    base = ["checkpointless=tier4", "strategy.num_distributed_optimizer_instances=2"]
    ok = ncl_launch(2, [*base, "trainer.max_steps=3"], tmp_path / "ok", spares=0).check()
    assert re.search(r"\[rank 0\] ncl\.progress INFO: step 3/3 loss \d+\.\d{6} step "
                     r"\d+\.\d+s \d+ tokens/s left 0:00:00", ok.output), ok.output[-3000:]
    nan = ncl_launch(2, [*base, "trainer.max_steps=6", "optim.lr=1e30",
                         "optim.warmup_steps=0", "optim.clip_grad=0"], tmp_path / "nan",
                     spares=1, timeout=240)
    assert nan.returncode == 3, nan.output[-3000:]
    assert "cannot recover: loss is nan at step 3" in nan.output
    assert "replacing it" not in nan.output
