"""Durable checkpoints resume bit for bit in every layout the package trains
(``make test-matrix``): save after step 2 of 4, resume a fresh job from it, compare."""

from __future__ import annotations

import pytest
from test_durable_resume import train

pytestmark = [pytest.mark.dist, pytest.mark.matrix, pytest.mark.timeout(600)]

LAYOUTS = {
    "dp4_2opt": ["strategy.num_distributed_optimizer_instances=2"],
    "pp2": ["strategy.pipeline_model_parallel_size=2"],
    "pp2_vp2": ["strategy.pipeline_model_parallel_size=2",
                "strategy.virtual_pipeline_model_parallel_size=2"],
    "tp2_bf16": ["strategy.tensor_model_parallel_size=2", "model.params_dtype=bfloat16"],
    "plain_optimizer": ["strategy.use_distributed_optimizer=false"],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_resume_is_exact(layout, tmp_path):
    root = tmp_path / "ckpt"
    _, full = train(tmp_path / "a", root, 2, "never", 4, LAYOUTS[layout])
    (root / "iter_0000004" / "ncl_manifest.json").unlink()  # as if the job died saving it
    _, resumed = train(tmp_path / "b", root, 0, "auto", 4, LAYOUTS[layout])
    assert resumed["resumed"]["checkpoint"] == "iter_0000002"
    assert resumed["losses"] == {k: v for k, v in full["losses"].items() if int(k) > 2}
    assert resumed["state_sha256"] == full["state_sha256"]
