"""Swap checkpointless into any NeMo 2 recipe, and apply Hydra-style overrides to it.

    from nemo.collections import llm
    from nemo_checkpointless.nemo import apply_checkpointless

    recipe = apply_checkpointless(llm.llama3_70b.pretrain_recipe(num_nodes=16), tier="tier4")

:func:`apply_checkpointless` changes exactly these fields of the recipe (a ``run.Partial``)
and keeps every other setting, including every argument of the objects it retargets:

* ``trainer.strategy``: retargeted to :class:`CheckpointlessMegatronStrategy` with
  ``tier`` (and ``fallback``, ``fault_plan`` when given) added;
* ``trainer.strategy.num_distributed_optimizer_instances``: 2 where the tier recovers from
  peers (tier 4: a replica of every optimizer shard), unless given;
* ``trainer.callbacks``: :class:`CheckpointlessCallback` first (it marks the start of each
  iteration before any other callback acts in it);
* ``resume``: retargeted to :class:`CheckpointlessResume`;
* ``optim``: a ``MegatronOptimizerModule`` is retargeted to
  :class:`CheckpointlessOptimizerModule` (same config and LR scheduler).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Iterable, Optional, Sequence

import fiddle as fdl
import nemo_run as run
from nemo.lightning.pytorch.optim.megatron import MegatronOptimizerModule
from nemo.lightning.pytorch.strategies import MegatronStrategy
from nemo.lightning.resume import AutoResume

from .. import config
from ..config import CheckpointlessConfig, ConfigError
from .callbacks import CheckpointlessCallback
from .optim import CheckpointlessOptimizerModule
from .resume import CheckpointlessResume
from .strategy import CheckpointlessMegatronStrategy

def apply_checkpointless(recipe: run.Partial, tier: str = "tier4", *,
                         num_distributed_optimizer_instances: Optional[int] = None,
                         fallback: Optional[str] = None,
                         fault_plan: Optional[Sequence[Any]] = None,
                         run_dir: Optional[str] = None) -> run.Partial:
    """Return ``recipe`` (changed in place) with the checkpointless fields swapped in."""
    trainer = getattr(recipe, "trainer", None)
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, fdl.Buildable) or not _is_subclass(strategy, MegatronStrategy):
        raise ConfigError("apply_checkpointless needs a NeMo 2 recipe whose trainer.strategy "
                          "is a run.Config of nemo.lightning.MegatronStrategy (from "
                          "nemo.collections.llm.<model>.pretrain_recipe()).")
    parts = CheckpointlessConfig.preset(tier)  # a bad tier fails before anything changes
    fdl.update_callable(strategy, CheckpointlessMegatronStrategy)
    strategy.tier = tier
    if fallback is not None:
        strategy.fallback = fallback
    if fault_plan:
        strategy.fault_plan = list(fault_plan)
    if num_distributed_optimizer_instances is None and parts.recovery == "peers":
        current = fdl.ordered_arguments(strategy).get("num_distributed_optimizer_instances", 1)
        num_distributed_optimizer_instances = max(2, int(current or 1))
    if num_distributed_optimizer_instances is not None:
        strategy.num_distributed_optimizer_instances = num_distributed_optimizer_instances
    callbacks = list(getattr(trainer, "callbacks", None) or [])
    if not any(_is_subclass(c, CheckpointlessCallback) for c in callbacks):
        callbacks.insert(0, run.Config(CheckpointlessCallback, run_dir=run_dir))
    trainer.callbacks = callbacks
    resume = getattr(recipe, "resume", None)
    if isinstance(resume, fdl.Buildable) and _is_subclass(resume, AutoResume):
        fdl.update_callable(resume, CheckpointlessResume)
    elif resume is None and "resume" in _parameters(recipe):
        recipe.resume = run.Config(CheckpointlessResume)
    optim = getattr(recipe, "optim", None)
    if isinstance(optim, fdl.Buildable) and _is_subclass(optim, MegatronOptimizerModule):
        fdl.update_callable(optim, CheckpointlessOptimizerModule)
    check_layout(recipe)
    return recipe


def check_layout(recipe: run.Partial, world_size: Optional[int] = None) -> None:
    """The recipe's layout through the package's one layout check (``config.check_layout``):
    sizes, optimizer instances, layers per pipeline stage, heads per tensor-parallel rank.

    ``world_size``: the job's (at start-up, strict). Without it the recipe's own
    (``trainer.num_nodes * trainer.devices``) is used, and only when it is a multiple of
    TP*PP*CP: NeMo's stock recipes are sized for their default node count and are checked
    again, strictly, when the job starts.
    """
    trainer = recipe.trainer
    s = fdl.ordered_arguments(trainer.strategy)
    tp = int(s.get("tensor_model_parallel_size", 1) or 1)
    pp = int(s.get("pipeline_model_parallel_size", 1) or 1)
    cp = int(s.get("context_parallel_size", 1) or 1)
    if world_size is None:
        nodes = getattr(trainer, "num_nodes", 1) or 1
        devices = getattr(trainer, "devices", 1)
        if not isinstance(devices, int) or not isinstance(nodes, int) or \
                (nodes * devices) % (tp * pp * cp):
            return
        world_size = nodes * devices
    vp = s.get("virtual_pipeline_model_parallel_size")
    model = getattr(getattr(recipe, "model", None), "config", None)

    def model_int(name: str) -> Optional[int]:
        value = getattr(model, name, None) if model is not None else None
        return value if isinstance(value, int) else None

    config.check_layout(
        world_size=world_size, tp=tp, pp=pp, cp=cp, vp=vp if isinstance(vp, int) else None,
        instances=int(s.get("num_distributed_optimizer_instances", 1) or 1),
        distributed_optimizer=uses_distributed_optimizer(recipe),
        num_layers=model_int("num_layers"), heads=model_int("num_attention_heads"),
        query_groups=model_int("num_query_groups"), ffn=model_int("ffn_hidden_size"))


def uses_distributed_optimizer(recipe: run.Partial) -> bool:
    """Whether megatron's distributed optimizer is used: the optimizer config decides (NeMo's
    strategy sets the DDP config's flag from it), else the DDP config."""
    optim = getattr(getattr(recipe, "optim", None), "config", None)
    value = getattr(optim, "use_distributed_optimizer", None) if optim is not None else None
    if value is None:
        ddp = fdl.ordered_arguments(recipe.trainer.strategy).get("ddp")
        value = getattr(ddp, "use_distributed_optimizer", True) if ddp is not None else True
    return bool(value)


# ---------------------------------------------------------------------- overrides
SECTIONS = {"strategy": ("trainer", "strategy"), "trainer": ("trainer",), "data": ("data",),
            "model": ("model",), "optim": ("optim",), "log": ("log",), "resume": ("resume",)}


def apply_overrides(recipe: run.Partial, overrides: Iterable[str]) -> run.Partial:
    """Hydra-style ``key=value`` overrides with NeMo's names (``strategy.`` = trainer.strategy).

    ``strategy.tensor_model_parallel_size=2``, ``trainer.max_steps=100``,
    ``trainer.num_nodes=16``, ``data.global_batch_size=64``, ``optim.config.lr=1e-4``,
    ``model.config.num_layers=2``. Values use Hydra's grammar (``null``, lists, dicts).
    A key that names no argument of its object raises ConfigError with the closest names.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    items = [o for o in overrides]
    if not items:
        return recipe
    try:
        parsed = OverridesParser.create().parse_overrides(items)
    except OverrideParseException as err:
        raise ConfigError(f"cannot read the overrides {items}: {err}. Quote a value that "
                          "holds '=', spaces or brackets: key='value'.") from None
    for item in parsed:
        key = item.key_or_group
        value = item.value()
        section, *rest = key.split(".")
        if section not in SECTIONS or not rest:
            raise ConfigError(f"unknown override '{key}': keys start with one of "
                              f"{', '.join(s + '.' for s in SECTIONS)} (NeMo's names).")
        node: Any = recipe
        for name in SECTIONS[section]:
            node = getattr(node, name)
        for name in rest[:-1]:
            _check_name(node, name, key)
            node = getattr(node, name)
        _check_name(node, rest[-1], key)
        setattr(node, rest[-1], value)
    check_layout(recipe)
    return recipe


def _check_name(node: Any, name: str, key: str) -> None:
    if not isinstance(node, fdl.Buildable):
        raise ConfigError(f"override '{key}': '{name}' is set on {type(node).__name__}, "
                          "which is not a configurable object of the recipe.")
    names = sorted(set(_parameters(node)) | set(fdl.ordered_arguments(node)))
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    target = getattr(node.__fn_or_cls__, "__name__", str(node.__fn_or_cls__))
    raise ConfigError(f"unknown override '{key}': {target} has no argument '{name}'.{hint}")


def _parameters(node: fdl.Buildable) -> list[str]:
    names: list[str] = []
    for cls in _mro(node.__fn_or_cls__):
        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):
            continue
        names += [p for p, v in params.items()
                  if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]
    return names


def _mro(target: Any) -> list[Any]:
    """A class and its bases (a subclass's ``**kwargs`` reach the base's arguments)."""
    if inspect.isclass(target):
        return [c for c in target.__mro__ if c is not object]
    return [target]


def _is_subclass(node: Any, cls: type) -> bool:
    target = getattr(node, "__fn_or_cls__", None)
    return inspect.isclass(target) and issubclass(target, cls)


# ---------------------------------------------------------------------- data
def pretraining_data(recipe: run.Partial, paths: Any, tokenizer: Optional[Any] = None,
                     **kwargs: Any) -> run.Partial:
    """Swap the recipe's data for NeMo's ``PreTrainingDataModule`` on a Megatron indexed
    dataset (``paths``: prefixes of ``.bin``/``.idx`` pairs, as written by
    ``scripts/data/build_dataset.py``), keeping the sequence length and batch sizes.
    ``tokenizer``: the one the dataset was built with (default: the package's bundled
    byte-level BPE, ``nemo_checkpointless.data.load_tokenizer``)."""
    from nemo.collections.llm.gpt.data.pre_training import PreTrainingDataModule

    from ..data.tokenizer import load_tokenizer

    old = fdl.ordered_arguments(recipe.data) if isinstance(recipe.data, fdl.Buildable) else {}
    keep = {k: old[k] for k in ("seq_length", "global_batch_size", "micro_batch_size",
                                "num_workers") if k in old}
    recipe.data = run.Config(PreTrainingDataModule, paths=paths,
                             tokenizer=tokenizer or run.Config(load_tokenizer),
                             **{**keep, **kwargs})
    return recipe
