"""apply_checkpointless on NeMo's real Llama-3 recipes keeps every other setting."""

from __future__ import annotations

import pytest

pytest.importorskip("nemo.collections.llm", reason="NeMo 2 is not installed here; run `make "
                    "test-nemo`, which uses .venv-nemo")

import fiddle as fdl  # noqa: E402  (after the skip: NeMo's env only)
from fiddle._src import daglish  # noqa: E402

from nemo.collections import llm

from nemo_checkpointless.config import ConfigError
from nemo_checkpointless.nemo import apply_checkpointless, apply_overrides
from nemo_checkpointless.nemo.callbacks import CheckpointlessCallback
from nemo_checkpointless.nemo.optim import CheckpointlessOptimizerModule
from nemo_checkpointless.nemo.resume import CheckpointlessResume
from nemo_checkpointless.nemo.strategy import CheckpointlessMegatronStrategy

RECIPES = {"llama3_8b": llm.llama3_8b, "llama3_70b": llm.llama3_70b}
# the only paths apply_checkpointless may change (targets, or values at these paths)
SWAPPED = {".trainer.strategy", ".trainer.strategy.tier",
           ".trainer.strategy.num_distributed_optimizer_instances", ".trainer.callbacks",
           ".resume", ".optim"}


def flatten(recipe) -> dict[str, object]:
    """Every leaf value and every Buildable's target of a fiddle tree, by path."""
    out: dict[str, object] = {}

    def visit(value, state):
        path = daglish.path_str(state.current_path)
        if isinstance(value, fdl.Buildable):
            out[path + "<target>"] = value.__fn_or_cls__
        elif not daglish.is_traversable_type(type(value)):
            out[path] = value
        return state.map_children(value)

    daglish.BasicTraversal.run(visit, recipe)
    return out


def changed(before: dict, after: dict) -> set[str]:
    keys = set(before) | set(after)
    return {k for k in keys if before.get(k, "<absent>") != after.get(k, "<absent>")}


def allowed(path: str) -> bool:
    bare = path.replace("<target>", "")
    return bare in SWAPPED or bare.startswith(".trainer.callbacks[")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_real_recipe_keeps_every_other_setting(name):
    before = flatten(RECIPES[name].pretrain_recipe())
    recipe = apply_checkpointless(RECIPES[name].pretrain_recipe(), tier="tier4")
    after = flatten(recipe)
    diff = changed(before, after)
    assert diff, "nothing was swapped"
    assert all(allowed(p) for p in diff), sorted(p for p in diff if not allowed(p))
    # the callbacks that were there are still there, in order, after ours
    stock = RECIPES[name].pretrain_recipe().trainer.callbacks or []
    assert recipe.trainer.callbacks[1:] == list(stock)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_swapped_fields(name):
    stock = RECIPES[name].pretrain_recipe()
    recipe = apply_checkpointless(RECIPES[name].pretrain_recipe(), tier="tier4")
    s, s0 = recipe.trainer.strategy, stock.trainer.strategy
    assert s.__fn_or_cls__ is CheckpointlessMegatronStrategy
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                "context_parallel_size", "virtual_pipeline_model_parallel_size",
                "sequence_parallel", "pipeline_dtype", "ckpt_async_save"):
        assert getattr(s, key) == getattr(s0, key), key
    assert fdl.ordered_arguments(s.ddp) == fdl.ordered_arguments(s0.ddp)
    assert s.tier == "tier4"
    assert s.num_distributed_optimizer_instances == 2
    assert recipe.trainer.callbacks[0].__fn_or_cls__ is CheckpointlessCallback
    assert recipe.resume.__fn_or_cls__ is CheckpointlessResume
    assert fdl.ordered_arguments(recipe.resume) == fdl.ordered_arguments(stock.resume)
    assert recipe.optim.__fn_or_cls__ is CheckpointlessOptimizerModule
    assert recipe.optim.config == stock.optim.config
    assert recipe.optim.lr_scheduler == stock.optim.lr_scheduler


def test_built_strategy_is_a_megatron_strategy():
    from nemo.lightning import MegatronStrategy

    recipe = apply_checkpointless(llm.llama3_70b.pretrain_recipe(), tier="tier4")
    strategy = fdl.build(recipe.trainer.strategy)
    assert isinstance(strategy, MegatronStrategy)
    assert strategy.tensor_model_parallel_size == 4
    assert strategy.virtual_pipeline_model_parallel_size == 5
    assert strategy.sequence_parallel is True
    assert strategy.num_distributed_optimizer_instances == 2
    assert strategy.ddp_config.num_distributed_optimizer_instances == 2
    assert strategy.parallelism.num_distributed_optimizer_instances == 2


def test_tier3_keeps_one_instance_and_explicit_k_wins():
    r = apply_checkpointless(llm.llama3_8b.pretrain_recipe(), tier="tier3")
    assert "num_distributed_optimizer_instances" not in fdl.ordered_arguments(r.trainer.strategy)
    r = apply_checkpointless(llm.llama3_8b.pretrain_recipe(), tier="tier4",
                             num_distributed_optimizer_instances=4)
    assert r.trainer.strategy.num_distributed_optimizer_instances == 4


def test_overrides_use_nemo_names():
    recipe = apply_checkpointless(llm.llama3_70b.pretrain_recipe(), tier="tier4")
    apply_overrides(recipe, ["strategy.tensor_model_parallel_size=8", "trainer.max_steps=100",
                             "trainer.num_nodes=16", "trainer.devices=8",
                             "data.global_batch_size=64", "optim.config.lr=1e-4"])
    assert recipe.trainer.strategy.tensor_model_parallel_size == 8
    assert recipe.trainer.max_steps == 100
    assert recipe.trainer.num_nodes == 16 and recipe.trainer.devices == 8
    assert recipe.data.global_batch_size == 64
    assert recipe.optim.config.lr == 1e-4


def test_misspelled_override_names_the_fix():
    recipe = apply_checkpointless(llm.llama3_8b.pretrain_recipe(), tier="tier4")
    with pytest.raises(ConfigError, match="Did you mean 'tensor_model_parallel_size'"):
        apply_overrides(recipe, ["strategy.tensor_model_paralel_size=2"])
    with pytest.raises(ConfigError, match="keys start with one of"):
        apply_overrides(recipe, ["stratgy.tensor_model_parallel_size=2"])


def test_impossible_optimizer_instances_fail_with_the_fix():
    recipe = apply_checkpointless(llm.llama3_8b.pretrain_recipe(), tier="tier4")
    # 1 node x 8 devices, TP1 PP1 CP2: DP x CP = 8; 3 does not divide it
    with pytest.raises(ConfigError, match="set it to a divisor of 8"):
        apply_overrides(recipe, ["strategy.num_distributed_optimizer_instances=3"])


def test_not_a_nemo_recipe():
    import nemo_run as run

    with pytest.raises(ConfigError, match="MegatronStrategy"):
        apply_checkpointless(run.Partial(dict, trainer=None))
