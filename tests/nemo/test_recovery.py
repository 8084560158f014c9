"""A NeMo job under ncl-launch recovers in process inside Lightning's own fit, exactly.

Real objects throughout: NeMo's ``llm.pretrain`` of the ``tiny_llama`` recipe (LlamaModel,
MegatronStrategy subclass, MegatronParallel, megatron's DDP and distributed optimizer
with 2 instances), Lightning's Trainer with NeMo's logger (TensorBoard), ModelCheckpoint
(every 4 steps) and validation (every 4 steps, 2 batches). Every run is compared with
Lightning's own ``fit`` of the same recipe under torchrun, bit for bit: each
``metrics.jsonl`` row, each TensorBoard value, the validation losses, the state hash.
"""

from __future__ import annotations

import pytest

pytest.importorskip("nemo.collections.llm", reason="NeMo 2 is not installed here; run `make "
                    "test-nemo`, which uses .venv-nemo")

from nemo_jobs import (STEPS, Agents, assert_same_run, deterministic, ncl_launch,  # noqa: E402
                       plan, torchrun)

pytestmark = [pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def two_faults(tmp_path_factory, real_data):
    """Rank 1 SIGKILLed in step 2 at its update (a warm spare takes its place), then rank 0
    (it writes the logs) SIGKILLed after step 4's update, so that its replacement joins
    rank 1 inside step 4's checkpoint save, before step 4's validation."""
    faults = plan((1, 2, "optimizer", "kill"), (0, 4, "after_step", "kill"))
    return ncl_launch(2, tmp_path_factory.mktemp("faults") / "run", *real_data, faults).check()


def test_killed_ranks_recover_exactly(two_faults, reference):
    assert_same_run(two_faults, reference)
    recoveries = two_faults.summary["recoveries"]
    assert len(recoveries) == 2 and all(r["bytes_transferred"] > 0 for r in recoveries)
    fired = [(e["fault_rank"], e["step"], e["phase"]) for e in two_faults.events
             if e["event"] == "fault"]
    assert fired == [(1, 2, "optimizer"), (0, 4, "after_step")]
    # the second recovery met inside step 4, after its update: at the checkpoint's barrier
    assert "catching up with the job at step 4, point 1 (committed step 4)" in two_faults.output


def test_logger_has_one_row_per_step_with_the_same_values(two_faults, reference):
    got, want = two_faults.tensorboard(), reference.tensorboard()
    assert deterministic(got) == deterministic(want)
    steps = sorted({step for step, tag in got if tag == "reduced_train_loss"})
    assert steps == list(range(STEPS)), "a row for every committed step (x axis: step - 1)"
    assert all(len(v) == 1 for (s, tag), v in got.items() if tag == "reduced_train_loss")


def test_validation_runs_at_its_interval_with_the_same_loss(two_faults, reference):
    got, want = two_faults.tensorboard(), reference.tensorboard()
    val = {step: v for (step, tag), v in got.items() if tag == "val_loss"}
    assert sorted(val) == [3, 7]  # after steps 4 and 8
    assert val == {step: v for (step, tag), v in want.items() if tag == "val_loss"}


def test_checkpoints_every_four_steps(two_faults, reference):
    names = [p.name for p in two_faults.checkpoints()]
    assert names == [p.name for p in reference.checkpoints()]
    assert [n.split("--")[1].split("-")[0] for n in names] == ["step=3", "step=7"]


def test_checkpoint_written_after_a_recovery_resumes_exactly(two_faults, reference, real_data,
                                                             tmp_path):
    """A new job (NeMo's own fit under torchrun) resumes through NeMo's AutoResume from the
    step-4 checkpoint the recovered job wrote, and ends as the fault-free job did."""
    (ckpt,) = [p for p in two_faults.checkpoints() if "step=3" in p.name]
    resumed = torchrun(2, tmp_path / "run", *real_data,
                       f"resume.resume_from_path='{ckpt}'").check()
    assert_same_run(resumed, reference, first_step=5)


def test_killed_agent_recovers_exactly(tmp_path, reference, real_data):
    """A whole node (its agent and its rank) dies after step 3; a warm standby node takes
    its place, its rank gets its state from the survivor."""
    agents = Agents(2, 1, tmp_path / "run", *real_data)
    agents.start(0)
    agents.start(1)
    agents.start_standby()
    agents.wait_for_step(3)
    agents.kill_node(1)
    job = agents.wait().check()
    assert_same_run(job, reference)
    assert deterministic(job.tensorboard()) == deterministic(reference.tensorboard())
    assert "node 1 lost: this standby takes it over" in job.output
    (rec,) = job.summary["recoveries"]
    assert rec["bytes_transferred"] > 0


def test_reference_records_the_lean_schema(reference):
    rows = reference.metrics
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(set(r) == {"step", "loss", "loss_hex", "consumed_samples", "step_time_s",
                          "grad_norm", "lr", "batch_hash"} for r in rows)
    assert [r["consumed_samples"] for r in rows] == [8 * s for s in range(1, STEPS + 1)]
    assert all(float.fromhex(r["loss_hex"]) == r["loss"] for r in rows)
    assert reference.summary["final_step"] == STEPS and len(reference.summary["state_sha256"]) == 64
