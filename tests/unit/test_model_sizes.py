"""Llama-3 8B/70B/405B recipes build with megatron's GPTModel on the meta device and
have the published parameter counts; every recipe carries the NeMo reference layout."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nemo_checkpointless.config import compose

BIG = ["llama3_8b", "llama3_70b", "llama3_405b"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("recipe", BIG)
def test_parameter_count_matches_published(recipe):
    out = subprocess.run(
        [sys.executable, "-m", "nemo_checkpointless.megatron.sizes", f"recipe={recipe}"],
        capture_output=True, text=True, timeout=110,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith(recipe)][-1]
    counted, published = line.split(": ")[1].split(" parameters (published ")
    assert counted == published.rstrip(")"), line


@pytest.mark.parametrize(
    "recipe,layout",
    [
        ("llama3_8b", (1, 1, None, 2)),
        ("llama3_70b", (4, 4, 5, 2)),
        ("llama3_405b", (8, 9, 2, 4)),
    ],
)
def test_reference_layouts_and_two_instance_variants(recipe, layout):
    for name, instances in ((recipe, 1), (recipe + "_2opt", 2)):
        cfg = compose([f"recipe={name}"])
        s = cfg.strategy
        got = (s.tensor_model_parallel_size, s.pipeline_model_parallel_size,
               s.virtual_pipeline_model_parallel_size, s.context_parallel_size)
        assert got == layout
        assert s.num_distributed_optimizer_instances == instances
        assert cfg.model.vocab_size == 128256
        assert cfg.model.normalization == "RMSNorm" and cfg.model.activation == "swiglu"
        assert cfg.model.position_embedding_type == "rope"
        assert cfg.model.num_query_groups == 8  # grouped-query attention
        assert cfg.data.seq_length == 8192 and cfg.data.global_batch_size == 512
