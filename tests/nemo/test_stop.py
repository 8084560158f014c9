"""A stop on request (SIGTERM to ncl-launch) in a NeMo job writes a NeMo checkpoint, and the
next job resumes from it through NeMo's AutoResume, exactly.

The job is the tiny_llama recipe on the real indexed dataset, 2 ranks under one agent;
the reference is Lightning's own fit of the same recipe under torchrun (conftest.py).
"""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

pytest.importorskip("nemo.collections.llm", reason="NeMo 2 is not installed here; run `make "
                    "test-nemo`, which uses .venv-nemo")

from nemo_jobs import STEPS, Agents, assert_same_run  # noqa: E402

pytestmark = [pytest.mark.timeout(1800)]


def last_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(run_dir / "log" / "*" / "checkpoints" /
                                                 "*-last")))


def test_sigterm_writes_a_nemo_checkpoint_and_the_next_job_resumes_exactly(real_data,
                                                                           reference,
                                                                           tmp_path):
    """SIGTERM once step 4 is committed (its tail, with the interval save and validation,
    takes seconds, so the stop lands after step 5 or so): every rank finishes the step they agree on (its callbacks,
    logger rows), the trainer's ModelCheckpoint writes the ``-last`` checkpoint of it and
    the agent exits 143; the same command then resumes there (AutoResume) and ends with
    every row and the state hash of the uninterrupted run."""
    run_dir = tmp_path / "run"
    first = Agents(1, 2, run_dir, *real_data)
    first.start(0)
    stopped, stop = first.stop_after(4)
    assert 4 < stop < STEPS, stop
    assert [r["step"] for r in stopped.metrics] == list(range(1, stop + 1))
    (ckpt,) = last_checkpoints(run_dir)
    assert f"--step={stop - 1}-" in ckpt.name  # NeMo names a step by global_step - 1
    how = "written by its interval save" if stop % 4 == 0 else "written for the stop"
    assert f"stopped after step {stop} as asked: NeMo checkpoint {ckpt} ({how})" in \
        stopped.output, stopped.output[-6000:]
    assert "summary.json" not in {p.name for p in run_dir.iterdir()}

    second = Agents(1, 2, run_dir, *real_data)
    second.start(0)
    resumed = second.wait().check()
    assert f"Restoring states from the checkpoint path at {ckpt}" in resumed.output or \
        str(ckpt) in resumed.output, resumed.output[-6000:]
    # one row per step across both jobs, each the uninterrupted run's; the same end state
    assert_same_run(resumed, reference)
    got = {k: v for k, v in resumed.tensorboard().items() if k[1] == "reduced_train_loss"}
    want = {k: v for k, v in reference.tensorboard().items() if k[1] == "reduced_train_loss"}
    assert got == want, "every step's logger row once, the stop step's included"
