"""Inside a Slurm step, a rank that ncl-launch started reads the world the agent defines.

Lightning picks ``SLURMEnvironment`` whenever ``SLURM_NTASKS`` is set; under ``ncl-launch``
that is the agent's step (one task per node), not the job's ranks. A NeMo job submitted to
a real Slurm stopped at start-up on it (tests/e2e/test_slurm_entries.py runs such jobs)."""

from __future__ import annotations

import pytest

pytest.importorskip("nemo.collections.llm", reason="NeMo 2 is not installed here; run `make "
                    "test-nemo`, which uses .venv-nemo")

from lightning.pytorch.plugins.environments import (  # noqa: E402
    LightningEnvironment, SLURMEnvironment)

from nemo_checkpointless.launch.channel import ENV_FD  # noqa: E402
from nemo_checkpointless.nemo.strategy import CheckpointlessMegatronStrategy  # noqa: E402

# what a rank of a one-task-per-node agent step sees from Slurm
SLURM_STEP = {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
              "SLURM_NODEID": "0", "SLURM_JOB_NAME": "ncl-node0", "SLURM_JOB_ID": "7"}


@pytest.fixture
def slurm_step(monkeypatch):
    for key, value in SLURM_STEP.items():
        monkeypatch.setenv(key, value)
    assert SLURMEnvironment.detect()  # what Lightning would pick by itself


def test_a_rank_under_ncl_launch_uses_the_agents_world(slurm_step, monkeypatch):
    monkeypatch.setenv(ENV_FD, "99")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("NODE_RANK", "0")
    environment = CheckpointlessMegatronStrategy().cluster_environment
    assert type(environment) is LightningEnvironment
    assert environment.local_rank() == 1 and environment.node_rank() == 0


def test_torchrun_and_a_chosen_environment_are_left_to_lightning(slurm_step, monkeypatch):
    monkeypatch.delenv(ENV_FD, raising=False)
    assert CheckpointlessMegatronStrategy().cluster_environment is None  # Lightning picks
    monkeypatch.setenv(ENV_FD, "99")
    mine = SLURMEnvironment()
    assert CheckpointlessMegatronStrategy(cluster_environment=mine).cluster_environment is mine
