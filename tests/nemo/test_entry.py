"""recipes/nemo_pretrain.py: dry run with NeMo-named overrides, and a clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nemo.collections.llm", reason="NeMo 2 is not installed here; run `make "
                    "test-nemo`, which uses .venv-nemo")

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "recipes" / "nemo_pretrain.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ENTRY), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env={"OMP_NUM_THREADS": "1",
                                                      "PATH": "/usr/bin:/bin"})


def test_dryrun_with_overrides():
    """What ``--dryrun`` prints: the recipe after the overrides (built in this process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nemo_pretrain", ENTRY)
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    recipe, _, dryrun = entry.build(["recipe=llama3_70b", "--dryrun", "trainer.num_nodes=16",
                                     "trainer.devices=8", "strategy.tensor_model_parallel_size=8",
                                     "trainer.max_steps=100"])
    assert dryrun
    text = str(recipe)
    assert "CheckpointlessMegatronStrategy(" in text
    assert "tensor_model_parallel_size=8" in text and "num_nodes=16" in text
    assert "num_distributed_optimizer_instances=2" in text
    assert "CheckpointlessCallback(" in text and "CheckpointlessResume(" in text
    assert "max_steps=100" in text and "virtual_pipeline_model_parallel_size=5" in text


def test_bad_override_is_a_clear_error():
    out = run("recipe=llama3_8b", "--dryrun", "strategy.tensor_model_paralel_size=2")
    assert out.returncode != 0
    assert ("error: unknown override 'strategy.tensor_model_paralel_size': "
            "CheckpointlessMegatronStrategy has no argument 'tensor_model_paralel_size'. "
            "Did you mean 'tensor_model_parallel_size'") in out.stderr
    assert "Traceback" not in out.stderr
