"""Fixtures shared by the NeMo tests: the dataset and the fault-free reference job (made
once per session: every recovered DP job is compared with it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nemo_jobs import REPO, nemo_env, torchrun


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """The package's bundled corpus as a Megatron indexed dataset, written by
    scripts/data/build_dataset.py with the bundled tokenizer."""
    prefix = tmp_path_factory.mktemp("data") / "tiny"
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "data" / "build_dataset.py"),
                          "--output-prefix", str(prefix)], cwd=REPO, capture_output=True,
                         text=True, timeout=900, env=nemo_env())
    assert out.returncode == 0, out.stderr[-3000:]
    return prefix


@pytest.fixture(scope="session")
def real_data(dataset):
    """Overrides that swap in NeMo's PreTrainingDataModule on ``dataset``."""
    return ("data=pretraining", f"data.paths=[{dataset}]")


@pytest.fixture(scope="session")
def reference(tmp_path_factory, real_data):
    """Lightning's own fit of the recipe under torchrun: no session, no recovery."""
    return torchrun(2, tmp_path_factory.mktemp("ref") / "run", *real_data).check()


@pytest.fixture(scope="session")
def chaos(tmp_path_factory, real_data):
    """Two nodes (one ncl-launch agent and one rank each, a warm spare each) and a warm
    standby node. Rank 1 is SIGKILLed in step 2 at its update (its node's spare takes its
    place); rank 0, which writes the logs, is SIGKILLed after step 4's update, so that its
    replacement catches up into step 4's checkpoint save, before step 4's validation; then
    node 1 as a whole (agent, rank, spare, store server) is killed and the standby node
    takes it over (its store shard from another address)."""
    from nemo_jobs import Agents, plan

    faults = plan((1, 2, "optimizer", "kill"), (0, 4, "after_step", "kill"))
    agents = Agents(2, 1, tmp_path_factory.mktemp("chaos") / "run", *real_data, faults)
    agents.start(0, spares=1)
    agents.start(1, spares=1)
    agents.start_standby()
    agents.wait_for_step(5)
    agents.kill_node(1)
    return agents.wait().check()
