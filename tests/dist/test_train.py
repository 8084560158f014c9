"""The foundation job on 4 gloo ranks: every layout trains, and runs are bitwise repeatable."""

from __future__ import annotations

import re

import pytest
from conftest import torchrun

from nemo_checkpointless import allocator

pytestmark = [pytest.mark.dist, pytest.mark.timeout(400)]

LAYOUTS = {
    "tp2_dp2": ["strategy.tensor_model_parallel_size=2"],
    "pp2_dp2": ["strategy.pipeline_model_parallel_size=2"],
    "dp4_2opt": ["strategy.num_distributed_optimizer_instances=2"],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_trains_and_loss_falls(layout, tmp_path):
    result = torchrun(4, [*LAYOUTS[layout], "trainer.max_steps=12"], tmp_path / "run").check()
    rows = result.metrics
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["consumed_samples"] for r in rows] == [8 * s for s in range(1, 13)]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert first > 8.0, "an untrained 4096-token model starts near ln(4096) = 8.3"
    assert last < first - 1.0, [r["loss"] for r in rows]
    for r in rows:
        assert float.fromhex(r["loss_hex"]) == r["loss"]
    summary = result.summary
    assert summary["final_step"] == 12
    assert len(summary["state_sha256"]) == 64


def test_two_identical_runs_are_bitwise_identical(tmp_path):
    """Also across host allocators: glibc's malloc in one run, tcmalloc/jemalloc (the CPU
    rehearsal default, when installed) in the other."""
    overrides = [*LAYOUTS["pp2_dp2"], "strategy.tensor_model_parallel_size=1", "trainer.max_steps=6"]
    a = torchrun(4, overrides, tmp_path / "a", env={"NCL_ALLOCATOR": "system"}).check()
    b = torchrun(4, overrides, tmp_path / "b", env={"NCL_ALLOCATOR": "auto"}).check()
    assert [r["loss_hex"] for r in a.metrics] == [r["loss_hex"] for r in b.metrics]
    assert a.summary["state_sha256"] == b.summary["state_sha256"]
    assert "host allocator: glibc malloc" in a.output
    if allocator.find("tcmalloc") or allocator.find("jemalloc"):
        assert re.search(r"host allocator: \S*lib(tcmalloc|jemalloc)", b.output), b.output[-3000:]

