"""apply_checkpointless and the entry's arguments on Bridge's real recipes, offline.

Bridge's own ``llama3_8b``, ``llama3_70b`` and ``llama31_405b`` pretrain configs, built from
the Hugging Face configs the package ships (an offline Hub cache), before and after
``apply_checkpointless``: one field differs, every other is equal.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from bridge_runs import ENTRY, REPO, env, needs_bridge

pytestmark = [needs_bridge, pytest.mark.timeout(600)]

# recipe -> (the world its name sizes it for, TP, PP, VP, CP)
RECIPES = {"llama3_8b": (2, 1, 1, None, 2), "llama3_70b": (32, 4, 4, 5, 2),
           "llama31_405b": (256, 8, 8, 2, 4)}


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    from nemo_checkpointless.bridge import apply, recipes
    from nemo_checkpointless.bridge.run import prepare

    prepare()
    recipes.use_shipped_configs(tmp_path_factory.mktemp("hub"))
    return apply, recipes


def as_tree(cfg) -> dict:
    from megatron.bridge.training.utils.omegaconf_utils import create_omegaconf_dict_config
    from omegaconf import OmegaConf

    return OmegaConf.to_container(create_omegaconf_dict_config(cfg)[0])


def differences(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += differences(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{path}.{key}")
        return out
    return [] if a == b else [path.lstrip(".")]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_real_recipe_changes_only_the_optimizer_instances(bridge, name):
    apply, recipes = bridge
    world, tp, pp, vp, cp = RECIPES[name]
    before = as_tree(recipes.build_recipe(name))
    cfg = apply.apply_checkpointless(recipes.build_recipe(name), "tier4", world_size=world)
    assert differences(before, as_tree(cfg)) == ["ddp.num_distributed_optimizer_instances"]
    assert cfg.ddp.num_distributed_optimizer_instances == 2
    m = cfg.model
    assert (m.tensor_model_parallel_size, m.pipeline_model_parallel_size,
            m.virtual_pipeline_model_parallel_size, m.context_parallel_size) == (tp, pp, vp, cp)
    assert cfg.ddp.use_distributed_optimizer and cfg.ddp.overlap_param_gather
    assert cfg.checkpointless.tier == "tier4" and cfg.checkpointless.parts.recovery == "peers"


def test_published_model_shapes_come_from_the_shipped_configs(bridge):
    _, recipes = bridge
    shapes = {name: recipes.build_recipe(name).model for name in RECIPES}
    assert [(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
             m.num_query_groups) for m in shapes.values()] == [
        (32, 4096, 14336, 32, 8), (80, 8192, 28672, 64, 8), (126, 16384, 53248, 128, 8)]
    assert shapes["llama31_405b"].rope_scaling and not shapes["llama3_8b"].rope_scaling


def test_odd_data_parallel_keeps_one_instance_and_bad_input_says_what_to_do(bridge):
    from nemo_checkpointless.config import CheckpointConfig, ConfigError

    apply, recipes = bridge
    # 3 ranks without tensor or pipeline parallelism: data parallel 3 (odd), no replica
    cfg = apply.apply_checkpointless(recipes.build_recipe("tiny_llama"), "tier4")
    assert cfg.ddp.num_distributed_optimizer_instances == 2
    with pytest.raises(ConfigError, match="ddp.num_distributed_optimizer_instances=2 must divide"):
        apply.check_bridge_layout(cfg, 3)
    cfg = apply.apply_checkpointless(recipes.build_recipe("tiny_llama"), "tier4", world_size=3)
    assert cfg.ddp.num_distributed_optimizer_instances == 1
    with pytest.raises(ConfigError, match="does not divide the world size 48"):
        apply.apply_checkpointless(recipes.build_recipe("llama3_70b"), "tier4", world_size=48)
    with pytest.raises(ConfigError, match="only parts of the lean loop"):
        apply.apply_checkpointless(recipes.build_recipe("tiny_llama"), "tier2")
    with pytest.raises(ConfigError, match="unknown checkpointless part"):
        apply.apply_checkpointless(recipes.build_recipe("tiny_llama"), "tier4", falback="disk")
    with pytest.raises(ConfigError, match="checkpointless.checkpoint.interval=0 turns them off"):
        apply.apply_checkpointless(recipes.build_recipe("tiny_llama"), "tier3",
                                   checkpoint=CheckpointConfig(interval=0))
    with pytest.raises(ConfigError, match="ConfigContainer"):
        apply.apply_checkpointless(object(), "tier4")
    restart = recipes.build_recipe("tiny_llama")
    from megatron.bridge.training.config import InProcessRestartConfig

    restart.inprocess_restart = InProcessRestartConfig(enabled=True)
    with pytest.raises(ConfigError, match="inprocess_restart.enabled=false"):
        apply.apply_checkpointless(restart, "tier4")


def test_core_checkpoints_keep_the_core_defaults_and_bad_ones_are_refused(bridge):
    """The core's durable checkpoints beside Bridge's own: the core's default (None: every
    100 steps under ncl-launch), off with interval 0 unless a rollback needs them."""
    from nemo_checkpointless.bridge.run import run_config
    from nemo_checkpointless.config import CheckpointConfig, ConfigError

    apply, recipes = bridge

    def interval(tier, **kw):
        cfg = apply.apply_checkpointless(recipes.build_recipe("tiny_llama"), tier, **kw)
        return run_config(cfg, 2, "/tmp/run").checkpoint.interval

    assert interval("tier4") is None and interval("tier3") is None
    assert interval("tier4", checkpoint=CheckpointConfig(interval=0)) == 0
    with pytest.raises(ConfigError, match="checkpointless.checkpoint.interval=0 turns them off"):
        interval("tier4", fallback="disk", checkpoint=CheckpointConfig(interval=0))
    cfg = apply.apply_checkpointless(recipes.build_recipe("tiny_llama"), "tier3",
                                     fault_plan=[{"rank": 2, "step": 1, "phase": "forward",
                                                  "kind": "kill"}])
    with pytest.raises(ConfigError, match="rank 2 does not exist"):
        run_config(cfg, 2, "/tmp/run")
    cfg = apply.apply_checkpointless(recipes.build_recipe("tiny_llama"), "tier3")
    cfg.checkpoint.save = "/tmp/run/checkpoints"
    with pytest.raises(ConfigError, match="also the directory of the core's durable"):
        run_config(cfg, 2, "/tmp/run")


def test_overrides_use_bridge_names_and_misspellings_name_the_fix(bridge):
    from nemo_checkpointless.config import ConfigError

    apply, recipes = bridge
    cfg = recipes.build_recipe("tiny_llama")
    before = as_tree(cfg)
    cfg = apply.apply_overrides(cfg, ["model.tensor_model_parallel_size=2",
                                      "train.global_batch_size=16", "optimizer.lr=1e-3",
                                      "scheduler.lr_warmup_iters=3", "dataset.seq_length=32"])
    assert sorted(differences(before, as_tree(cfg))) == [
        "dataset.seq_length", "model.tensor_model_parallel_size", "optimizer.lr",
        "scheduler.lr_warmup_iters", "train.global_batch_size"]
    assert callable(cfg.model.transformer_layer_spec)  # callables survive the round trip
    with pytest.raises(ConfigError, match="Did you mean 'tensor_model_parallel_size'"):
        apply.apply_overrides(cfg, ["model.tensor_model_paralel_size=2"])
    with pytest.raises(ConfigError, match="Did you mean 'train'"):
        apply.apply_overrides(cfg, ["trian.train_iters=2"])
    with pytest.raises(KeyError, match="Did you mean llama3_8b"):
        recipes.build_recipe("llama3_8bb")


def test_entry_dryrun_prints_the_resulting_recipe():
    out = subprocess.run(
        [sys.executable, str(ENTRY), "recipe=llama3_70b", "checkpointless=tier4", "--dryrun",
         "model.tensor_model_parallel_size=8", "train.global_batch_size=1024",
         "fault.plan=[{rank:3,step:7,phase:optimizer,kind:kill}]"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stderr[-4000:]
    text = out.stdout
    assert "tensor_model_parallel_size: 8" in text and "global_batch_size: 1024" in text
    assert "num_distributed_optimizer_instances: 2" in text
    assert "tier: tier4" in text and "recovery: peers" in text and "phase: optimizer" in text


def test_entry_refuses_a_misspelled_bridge_key_before_building(bridge):
    from nemo_checkpointless.bridge.entry import build_config, parse_args
    from nemo_checkpointless.config import ConfigError

    with pytest.raises(ConfigError, match="Did you mean 'train_iters'"):
        build_config(parse_args(["recipe=tiny_llama", "train.train_itres=3"]))
