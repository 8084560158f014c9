"""The Bridge entry's command line (no Bridge needed; the Slurm supervisor's ENTRY=bridge is
tested in tests/unit/test_slurm_script.py)."""

from __future__ import annotations

import pytest

from nemo_checkpointless.bridge.entry import parse_args
from nemo_checkpointless.config import ConfigError


def test_arguments_split_into_own_hydra_and_bridge_keys():
    args = parse_args(["recipe=llama3_70b", "checkpointless=tier4", "--dryrun",
                       "checkpointless.fallback=disk", "checkpointless.interrupt=on",
                       "checkpointless.checkpoint.interval=3",
                       "fault.plan=[{rank:1,step:3,phase:forward,kind:kill}]",
                       "hydra.run.dir=/tmp/x", "model.tensor_model_parallel_size=8",
                       "optimizer.lr=1e-4", "hf_hub=online"])
    assert (args.recipe, args.tier, args.dryrun, args.hf_hub) == ("llama3_70b", "tier4", True,
                                                                    "online")
    assert args.parts == {"fallback": "disk", "interrupt": "on"}
    assert args.checkpoint == {"interval": 3}
    assert args.fault_plan == [{"rank": 1, "step": 3, "phase": "forward", "kind": "kill"}]
    assert args.hydra == ["hydra.run.dir=/tmp/x"]
    assert args.bridge == ["model.tensor_model_parallel_size=8", "optimizer.lr=1e-4"]


@pytest.mark.parametrize("argv,message", [
    (["recipe"], "cannot read argument 'recipe'"),
    (["checkpointless.fallbak=disk"], "checkpointless parts are fallback, interrupt, recovery"),
    (["checkpointless.checkpoint.intervall=3"], "durable checkpoints take"),
    (["fault.plan={rank:1}"], "expected a list"),
    (["hf_hub=maybe"], "use shipped"),
])
def test_bad_arguments_say_what_to_do(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)
