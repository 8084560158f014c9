"""A Megatron-Bridge recipe recovers in process, bit for bit (the latest lane only).

tiny_llama (Bridge's ``_pretrain_common`` + ``AutoBridge`` over a shipped Llama config:
bf16 mixed precision, Bridge's distributed optimizer with overlapped grad reduce and param
gather, validation every 4 iterations) on 2 CPU gloo ranks, tier 4 (2 optimizer instances:
each rank's shard has a replica on the other), and once tier 3 (a rollback to the core's
durable checkpoint). Every test compares with the fault-free run, every ``loss_hex`` and
the ``state_sha256``, and checks that each fault fired.
"""

from __future__ import annotations


import pytest

from bridge_runs import Agents, assert_same_run, ncl_launch, needs_bridge, plan, torchrun

pytestmark = [needs_bridge, pytest.mark.timeout(1500)]

STEPS = 8
BASE = ["recipe=tiny_llama", "checkpointless=tier4", f"train.train_iters={STEPS}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The fault-free run under ncl-launch (the recovery loop driving Bridge's loop)."""
    return ncl_launch(2, BASE, tmp_path_factory.mktemp("ref") / "run", spares=0).check()


def fault_events(run) -> list[tuple]:
    return [(e["fault_rank"], e["step"], e["phase"], e["kind"]) for e in run.events
            if e["event"] == "fault"]


def test_bridge_alone_under_torchrun_equals_the_driven_run(reference, tmp_path):
    """Bridge's own launch and loop (``pretrain()`` under torchrun, its optimizer step in
    one piece) and the same recipe driven by the recovery loop: the same bits."""
    alone = torchrun(2, BASE, tmp_path / "run").check()
    assert [r["step"] for r in alone.metrics] == list(range(1, STEPS + 1))
    assert all(float.fromhex(r["loss_hex"]) == r["loss"] for r in alone.metrics)
    assert_same_run(alone, reference)
    assert reference.summary["recoveries"] == []
    # Bridge's loop still decides its own logging and validation when driven
    for run in (alone, reference):
        assert "validation loss at iteration 4" in run.output
        assert "validation loss at iteration 8 on test set" in run.output


FAULTS = [(1, 2, "forward", "kill"), (0, 3, "optimizer", "kill"), (1, 6, "after_step", "kill")]


@pytest.fixture(scope="module")
def recovered(tmp_path_factory):
    """Ranks SIGKILLed in forward, optimizer and after_step of one run, while Bridge saves
    torch_dist checkpoints every 4 iterations (both saves after a recovery)."""
    root = tmp_path_factory.mktemp("recovered")
    save = [f"checkpoint.save={root / 'ckpt'}", "checkpoint.save_interval=4"]
    return ncl_launch(2, [*BASE, *save, plan(*FAULTS)], root / "run", spares=1), root / "ckpt"


def test_rank_killed_in_forward_optimizer_and_after_step_recovers_exactly(reference, recovered):
    run, _ = recovered
    assert_same_run(run, reference)
    assert sorted(fault_events(run)) == sorted(FAULTS)
    recoveries = run.summary["recoveries"]
    assert len(recoveries) == len(FAULTS)
    assert all(rec["bytes_transferred"] > 0 for rec in recoveries)


def test_whole_agent_killed_and_replaced(reference, tmp_path):
    agents = Agents(2, 1, BASE, tmp_path / "run")
    agents.start(0)
    agents.start(1)
    agents.wait_for_step(3)
    agents.kill_node(1)  # the agent and its rank: gone
    agents.start(1)      # the scheduler's replacement node
    run = agents.wait()
    assert_same_run(run, reference)
    assert "rejoins the job as a replacement" in run.output
    assert len(run.summary["recoveries"]) == 1


def test_tier3_rolls_back_to_the_core_checkpoint(reference, tmp_path):
    """Tier 3 (every rank rolls back to the core's durable checkpoint, here written every 2
    steps) with the reference's layout (2 optimizer instances): a rank killed in step 5's
    forward, the job redoes 5..8 from the step-4 checkpoint, exactly."""
    args = [*(a for a in BASE if not a.startswith("checkpointless=")), "checkpointless=tier3",
            "ddp.num_distributed_optimizer_instances=2",
            "checkpointless.checkpoint.interval=2", plan((1, 5, "forward", "kill"))]
    run = ncl_launch(2, args, tmp_path / "run", spares=1)
    assert_same_run(run, reference)
    (rec,) = run.summary["recoveries"]
    assert (rec["checkpoint_step"], rec["resumed_step"]) == (4, 5) and rec["bytes_loaded"] > 0
    assert fault_events(run) == [(1, 5, "forward", "kill")]


def test_checkpoint_written_after_recoveries_resumes_in_bridge(reference, recovered, tmp_path):
    """Bridge's own resume (torchrun, ``checkpoint.load``) from the iteration-4 checkpoint
    the recovered run wrote trains 5..8 exactly as the fault-free run did."""
    _, ckpt = recovered
    assert (ckpt / "iter_0000004").is_dir() and (ckpt / "iter_0000008").is_dir()
    resumed = torchrun(2, [*BASE, f"checkpoint.load={ckpt}", "checkpoint.ckpt_step=4",
                           "checkpoint.save=null"], tmp_path / "resumed").check()
    assert "successfully loaded checkpoint" in resumed.output
    assert_same_run(resumed, reference, steps=range(5, STEPS + 1))


def test_sigterm_writes_bridge_and_core_checkpoints_and_both_resume_exactly(reference,
                                                                            tmp_path):
    """SIGTERM to the agent after step 5, with the recipes' default of Bridge loading from
    its own save directory (``checkpoint.load`` = ``checkpoint.save``): every rank finishes
    the step they agree on; Bridge's checkpoint of it (its save_interval, 4, does not cover
    it unless the stop lands on 4's multiple) and the core's durable one are written, and
    the agent exits 143. Then Bridge's own resume (torchrun, the latest checkpoint) and a
    new ncl-launch job with the same command (the core's checkpoint) both continue exactly
    as the run without the stop."""
    ckpt = tmp_path / "ckpt"
    args = [*BASE, f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}"]
    first = Agents(1, 2, args, tmp_path / "run")
    first.start(0)
    stopped, stop = first.stop_after(5)
    assert 5 <= stop < STEPS, stop
    assert (ckpt / f"iter_{stop:07d}").is_dir()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(stop)
    core = tmp_path / "run" / "checkpoints" / f"iter_{stop:07d}" / "ncl_manifest.json"
    assert core.exists()
    how = "written by its save_interval" if stop % 4 == 0 else "written to"
    assert f"stopping after iteration {stop}: Bridge's checkpoint of it" in stopped.output
    assert how in stopped.output

    bridge = torchrun(2, [*BASE, f"checkpoint.load={ckpt}", "checkpoint.save=null"],
                      tmp_path / "bridge-resumed").check()
    assert "successfully loaded checkpoint" in bridge.output
    assert_same_run(bridge, reference, steps=range(stop + 1, STEPS + 1))

    second = Agents(1, 2, args, tmp_path / "run")
    second.start(0)
    chained = second.wait()
    assert f"resumed at step {stop}" in chained.output, chained.output[-8000:]
    assert_same_run(chained, reference)  # rows 1..8 across both jobs, the same end state
