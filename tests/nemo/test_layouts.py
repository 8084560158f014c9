"""Tensor- and pipeline-parallel NeMo layouts recover exactly under ncl-launch.

4 ranks each (DP=2 with 2 optimizer instances, so every optimizer shard has a replica):
TP=2 loses rank 1 (rank 0's tensor-parallel partner) after step 4's update, inside the
checkpoint's recovery points; PP=2 loses rank 2 (the last stage, which computes the loss
rank 0 logs) in step 3's gradient reduction. Each run ends as Lightning's own fit of the
same layout under torchrun: every metrics row, every TensorBoard value, the state hash.
"""

from __future__ import annotations

import pytest

pytest.importorskip("nemo.collections.llm", reason="NeMo 2 is not installed here; run `make "
                    "test-nemo`, which uses .venv-nemo")

from nemo_jobs import assert_same_run, deterministic, ncl_launch, plan, torchrun  # noqa: E402

pytestmark = [pytest.mark.timeout(1800)]

LAYOUTS = {
    "tp2": (["strategy.tensor_model_parallel_size=2"], (1, 4, "after_step", "kill")),
    "pp2": (["strategy.pipeline_model_parallel_size=2"], (2, 3, "grad_sync", "kill")),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_recovers_exactly(layout, tmp_path):
    overrides, fault = LAYOUTS[layout]
    want = torchrun(4, tmp_path / "ref", *overrides).check()
    got = ncl_launch(4, tmp_path / "run", *overrides, plan(fault)).check()
    assert_same_run(got, want)
    assert deterministic(got.tensorboard()) == deterministic(want.tensorboard())
    assert [e["fault_rank"] for e in got.events if e["event"] == "fault"] == [fault[0]]
    (rec,) = got.summary["recoveries"]
    assert rec["bytes_transferred"] > 0
    assert got.summary["layout"][layout[:2]] == 2
