"""A NeMo job under ncl-launch recovers in process inside Lightning's own fit, exactly.

Real objects throughout: NeMo's ``llm.pretrain`` of the ``tiny_llama`` recipe on a real
Megatron indexed dataset (LlamaModel, MegatronStrategy subclass, MegatronParallel,
megatron's DDP and distributed optimizer with 2 instances), Lightning's Trainer with
NeMo's logger (TensorBoard), ModelCheckpoint (every 4 steps) and validation (every 4
steps, 2 batches). The job (``chaos`` in conftest.py) loses rank 1, then rank 0, then a
whole node, and is compared with Lightning's own ``fit`` of the same recipe under
torchrun, bit for bit: each ``metrics.jsonl`` row, each TensorBoard value, the
validation losses, the checkpoints, the state hash.
"""

from __future__ import annotations

import pytest

pytest.importorskip("nemo.collections.llm", reason="NeMo 2 is not installed here; run `make "
                    "test-nemo`, which uses .venv-nemo")

from nemo_jobs import STEPS, assert_same_run, deterministic  # noqa: E402

pytestmark = [pytest.mark.timeout(1800)]


def test_killed_ranks_and_node_recover_exactly(chaos, reference):
    assert_same_run(chaos, reference)
    recoveries = chaos.summary["recoveries"]
    assert len(recoveries) == 3 and all(r["bytes_transferred"] > 0 for r in recoveries)
    fired = [(e["fault_rank"], e["step"], e["phase"]) for e in chaos.events
             if e["event"] == "fault"]
    assert fired == [(1, 2, "optimizer"), (0, 4, "after_step")]
    # the second recovery met inside step 4, after its update: at the checkpoint's barrier
    assert "catching up with the job at step 4, point 1 (committed step 4)" in chaos.output
    assert "node 1 lost: this standby takes it over" in chaos.output


def test_logger_has_one_row_per_step_with_the_same_values(chaos, reference):
    got, want = chaos.tensorboard(), reference.tensorboard()
    assert deterministic(got) == deterministic(want)
    steps = sorted({step for step, tag in got if tag == "reduced_train_loss"})
    assert steps == list(range(STEPS)), "a row for every committed step (x axis: step - 1)"
    assert all(len(v) == 1 for (s, tag), v in got.items() if tag == "reduced_train_loss")


def test_validation_runs_at_its_interval_with_the_same_loss(chaos, reference):
    got, want = chaos.tensorboard(), reference.tensorboard()
    val = {step: v for (step, tag), v in got.items() if tag == "val_loss"}
    assert sorted(val) == [3, 7]  # after steps 4 and 8
    assert val == {step: v for (step, tag), v in want.items() if tag == "val_loss"}


def test_checkpoints_every_four_steps(chaos, reference):
    names = [p.name for p in chaos.checkpoints()]
    assert names == [p.name for p in reference.checkpoints()]
    assert [n.split("--")[1].split("-")[0] for n in names] == ["step=3", "step=7"]


def test_reference_records_the_lean_schema(reference):
    rows = reference.metrics
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(set(r) == {"step", "loss", "loss_hex", "consumed_samples", "step_time_s",
                          "grad_norm", "lr", "batch_hash"} for r in rows)
    assert [r["consumed_samples"] for r in rows] == [8 * s for s in range(1, STEPS + 1)]
    assert all(float.fromhex(r["loss_hex"]) == r["loss"] for r in rows)
    assert reference.summary["final_step"] == STEPS and len(reference.summary["state_sha256"]) == 64
