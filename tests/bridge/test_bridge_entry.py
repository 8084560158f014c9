"""The Bridge entry's command line and the Slurm supervisor running it (no Bridge needed)."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from bridge_runs import REPO

from nemo_checkpointless.bridge.entry import parse_args
from nemo_checkpointless.config import ConfigError

SBATCH = REPO / "scripts" / "slurm" / "pretrain.sbatch"


def test_arguments_split_into_own_hydra_and_bridge_keys():
    args = parse_args(["recipe=llama3_70b", "checkpointless=tier4", "--dryrun",
                       "checkpointless.fallback=disk", "checkpointless.checkpoint_interval=3",
                       "fault.plan=[{rank:1,step:3,phase:forward,kind:kill}]",
                       "hydra.run.dir=/tmp/x", "model.tensor_model_parallel_size=8",
                       "optimizer.lr=1e-4", "hf_hub=online"])
    assert (args.recipe, args.tier, args.dryrun, args.hf_hub) == ("llama3_70b", "tier4", True,
                                                                    "online")
    assert args.parts == {"fallback": "disk", "checkpoint_interval": 3}
    assert args.fault_plan == [{"rank": 1, "step": 3, "phase": "forward", "kind": "kill"}]
    assert args.hydra == ["hydra.run.dir=/tmp/x"]
    assert args.bridge == ["model.tensor_model_parallel_size=8", "optimizer.lr=1e-4"]


@pytest.mark.parametrize("argv,message", [
    (["recipe"], "cannot read argument 'recipe'"),
    (["checkpointless.fallbak=disk"], "checkpointless parts are"),
    (["fault.plan={rank:1}"], "expected a list"),
    (["hf_hub=maybe"], "use shipped"),
])
def test_bad_arguments_say_what_to_do(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_slurm_supervisor_starts_the_bridge_entry_on_every_node():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NCL_", "SPARE", "STORE_", "OVERRIDES", "RECIPE"))}
    env.update(SLURM_JOB_ID="77", NCL_HOSTS="node-a,node-b", NCL_DRY_RUN="1",
               NCL_ENTRY="recipes/bridge_pretrain.py", RECIPE="llama3_70b",
               OVERRIDES="checkpointless=tier4", NCL_JOB_SECRET="not-printed")
    out = subprocess.run(["bash", str(SBATCH), "train.train_iters=10"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and "not-printed" not in out.stdout + out.stderr
    for line in lines:
        words = shlex.split(line)
        script = words.index(str(REPO / "recipes" / "bridge_pretrain.py"))
        assert words[script + 1:] == ["recipe=llama3_70b", "checkpointless=tier4",
                                      "train.train_iters=10"]
