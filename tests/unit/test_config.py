"""Bad configuration fails before any process group starts, naming the key and the fix."""

from __future__ import annotations

import pytest

from conftest import python_run
from nemo_checkpointless.config import ConfigError, check_overrides, compose, validate


def test_misspelled_override_names_the_right_key(run_dir):
    r = python_run(["strategy.tensor_model_paralel_size=2"], run_dir, timeout=60)
    assert r.returncode == 2, r.output[-2000:]
    assert "unknown override 'strategy.tensor_model_paralel_size'" in r.output
    assert "Did you mean 'strategy.tensor_model_parallel_size'" in r.output
    assert not run_dir.exists() or not (run_dir / "metrics.jsonl").exists()


def test_layout_that_does_not_divide_world_fails_before_process_group(run_dir):
    # WORLD_SIZE=4 but no peers and no master: reaching init_process_group would hang.
    env = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "1"}
    r = python_run(["strategy.tensor_model_parallel_size=3"], run_dir, timeout=60, env=env)
    assert r.returncode == 2, r.output[-2000:]
    assert "does not divide the world size 4" in r.output
    assert "strategy.tensor_model_parallel_size" in r.output


def test_wrong_type_names_the_key(run_dir):
    r = python_run(["trainer.max_steps=many"], run_dir, timeout=60)
    assert r.returncode != 0
    assert "trainer.max_steps" in r.output


def test_unknown_recipe_lists_the_choices(run_dir):
    r = python_run(["recipe=llama9"], run_dir, timeout=60)
    assert r.returncode != 0
    assert "llama3_70b" in r.output and "tiny_gpt" in r.output


def test_unknown_tier_is_refused(run_dir):
    r = python_run(["checkpointless=tier9"], run_dir, timeout=60)
    assert r.returncode != 0
    assert "checkpointless" in r.output and "off" in r.output


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (["strategy.pipeline_model_parallel_size=3"], 6, "model.num_layers=4 is not divisible"),
        (["data.global_batch_size=6"], 4, "set data.global_batch_size to a multiple of 8"),
        (["strategy.num_distributed_optimizer_instances=3"], 4, "set it to a divisor of 4"),
        (["strategy.context_parallel_size=2"], 4, "set strategy.context_parallel_size=1"),
        (["trainer.max_steps=0"], 4, "trainer.max_steps=0: must be a positive integer"),
        (["strategy.tensor_model_parallel_size=8"], 8, "must divide model.num_attention_heads"),
    ],
)
def test_validate_messages(overrides, world, message):
    cfg = compose(overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("*", r"\*")):
        validate(cfg, world, cpu_mode=True)


def test_good_layouts_validate():
    for overrides in (["strategy.tensor_model_parallel_size=2"],
                      ["strategy.pipeline_model_parallel_size=2"],
                      ["recipe=tiny_gpt_2opt"]):
        validate(compose(overrides), 4, cpu_mode=True)


def test_check_overrides_accepts_groups_and_hydra_keys():
    check_overrides(["recipe=llama3_8b", "checkpointless=off", "hydra.run.dir=/tmp/x",
                     "fault.plan=[]", "+hydra.job.name=x"])
    with pytest.raises(ConfigError, match="Valid keys under 'trainer'"):
        check_overrides(["trainer.max_stepz=3"])


# ---------------------------------------------------------------- checkpoint-restart baseline
KILL = "fault.plan=[{rank:1,step:5,phase:optimizer,kind:kill}]"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["checkpointless=tier4", "restart.enabled=true"], "needs checkpointless=off"),
        (["restart.enabled=true", "restart.checkpoint_interval=0"],
         "restart.checkpoint_interval=0: must be a positive"),
        (["restart.enabled=true", "restart.checkpoint_keep=0"], "keep at least 1"),
        (["restart.enabled=true", "restart.resume=latest"], "use one of auto, never"),
        ([KILL], "or, for the checkpoint-restart baseline"),
        (["restart.enabled=true", "fault.plan=[{rank:1,step:5,phase:forward,kind:hang}]"],
         "use kind: kill faults"),
        (["restart.enabled=true", "fault.plan=[{rank:1,step:5,phase:recovery,kind:kill}]"],
         "no phase: recovery"),
    ],
)
def test_restart_validation_messages(overrides, message):
    cfg = compose(overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, 4, cpu_mode=True)


def test_restart_with_kill_faults_validates():
    cfg = compose(["restart.enabled=true", "restart.checkpoint_interval=3", KILL])
    validate(cfg, 4, cpu_mode=True)
    assert cfg.restart.enabled and cfg.restart.checkpoint_interval == 3
    assert cfg.restart.resume == "auto" and cfg.restart.checkpoint_dir is None


def test_restart_override_typo_names_the_key():
    with pytest.raises(ConfigError, match="restart.checkpoint_interval"):
        check_overrides(["restart.checkpoint_intervall=3"])


def test_a_fault_plan_without_ncl_launch_is_refused(run_dir):
    """Without the agent nothing would inject the faults (let alone recover): say so."""
    r = python_run(["checkpointless=tier4", "trainer.max_steps=2",
                    "fault.plan=[{rank:0,step:1,phase:forward,kind:kill}]"], run_dir,
                   timeout=120)
    assert r.returncode == 2, r.output[-2000:]
    assert "fault.plan needs in-process recovery, which runs under ncl-launch" in r.output
