"""The command line of ``recipes/bridge_pretrain.py``: own keys, Bridge's overrides, a run.

Arguments are split three ways:

* this package's keys: ``recipe=<name>``, ``checkpointless=<tier>`` (``off``, ``tier3``,
  ``tier4``), ``checkpointless.<part>=<v>`` (one part of the tier's preset that a Bridge
  run reads: ``recovery``, ``fallback``, ``interrupt``; ``config.CheckpointlessConfig``),
  ``checkpointless.checkpoint.<key>=<v>`` (the core's durable checkpoints: ``interval``,
  ``dir``, ...; ``config.CheckpointConfig``; Bridge's own ``checkpoint.*`` is Bridge's),
  ``fault.plan=[...]``, ``hf_hub=shipped|online`` and the flag ``--dryrun``;
* Hydra's: ``hydra.*`` (``hydra.run.dir=...``), handed to ``@hydra.main``;
* everything else is an override of the Bridge ConfigContainer with Bridge's own names
  (``model.tensor_model_parallel_size=2``, ``train.train_iters=100``, ``optimizer.lr=1e-4``),
  applied by Bridge's override machinery (``apply.apply_overrides``).

Values use Hydra's grammar. ``hf_hub=shipped`` (default) reads the Hugging Face configs of
Bridge's Llama recipes from the ones the package ships, offline (``recipes.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import CheckpointConfig, ConfigError
from .apply import BRIDGE_PARTS

USAGE = ("usage: bridge_pretrain.py recipe=<name> [--dryrun] [checkpointless=<tier>] "
         "[checkpointless.<part>=<value>] [checkpointless.checkpoint.<key>=<value>] "
         "[fault.plan=[...]] [hf_hub=shipped|online] [hydra.run.dir=<dir>] "
         "[<bridge.key>=<value> ...]  (Bridge's names: model.*, train.*, optimizer.*, ...)")
OWN = ("recipe", "checkpointless", "fault.plan", "hf_hub")
_PARTS = set(BRIDGE_PARTS)
_CHECKPOINT = set(CheckpointConfig.__dataclass_fields__)


@dataclass
class Args:
    """A parsed command line (see module doc)."""

    recipe: str = "tiny_llama"
    tier: str = "off"
    parts: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)
    fault_plan: list[Any] = field(default_factory=list)
    hf_hub: str = "shipped"
    hydra: list[str] = field(default_factory=list)
    bridge: list[str] = field(default_factory=list)
    dryrun: bool = False


def _value(text: str) -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([f"v={text}"])[0].value()


def parse_args(argv: list[str]) -> Args:
    """Split ``argv`` (see module doc); raises ConfigError with the usage on bad input."""
    args = Args()
    for arg in argv:
        if arg in ("--dryrun", "--dry-run"):
            args.dryrun = True
            continue
        if "=" not in arg or arg.startswith("-"):
            raise ConfigError(f"cannot read argument {arg!r}\n{USAGE}")
        key, text = arg.split("=", 1)
        bare = key.lstrip("+~")
        if bare.startswith("hydra.") or bare.startswith("hydra/"):
            args.hydra.append(arg)
        elif bare == "recipe":
            args.recipe = text
        elif bare == "checkpointless":
            args.tier = text
        elif bare.startswith("checkpointless.checkpoint."):
            name = bare.split(".", 2)[2]
            if name not in _CHECKPOINT:
                raise ConfigError(f"unknown key {bare!r}: the core's durable checkpoints take "
                                  f"{', '.join(sorted(_CHECKPOINT))}")
            args.checkpoint[name] = _value(text)
        elif bare.startswith("checkpointless."):
            part = bare.split(".", 1)[1]
            if part not in _PARTS:
                raise ConfigError(f"unknown key {bare!r}: checkpointless parts are "
                                  f"{', '.join(sorted(_PARTS))}")
            args.parts[part] = _value(text)
        elif bare == "fault.plan":
            plan = _value(text)
            if not isinstance(plan, list):
                raise ConfigError(f"fault.plan={text!r}: expected a list like "
                                  "[{rank:1,step:3,phase:forward,kind:kill}]")
            args.fault_plan = plan
        elif bare == "hf_hub":
            if text not in ("shipped", "online"):
                raise ConfigError(f"hf_hub={text!r}: use shipped (the configs the package "
                                  "ships, offline) or online (the Hugging Face Hub)")
            args.hf_hub = text
        else:
            args.bridge.append(arg)
    return args


def build_config(args: Args, world_size: Optional[int] = None) -> Any:
    """Bridge's recipe ``args.recipe`` with the checkpointless parts and the overrides."""
    from . import recipes
    from .apply import apply_checkpointless, apply_overrides

    if args.hf_hub == "shipped":
        recipes.use_shipped_configs()
    try:
        cfg = recipes.build_recipe(args.recipe)
    except KeyError as err:
        raise ConfigError(str(err.args[0])) from None
    cfg = apply_overrides(cfg, args.bridge)
    given = any(o.split("=", 1)[0].lstrip("+") == "ddp.num_distributed_optimizer_instances"
                for o in args.bridge)  # an explicit count stays
    try:
        checkpoint = CheckpointConfig(**args.checkpoint)
    except TypeError as err:
        raise ConfigError(f"checkpointless.checkpoint: {err}") from None
    return apply_checkpointless(
        cfg, args.tier, world_size=world_size, checkpoint=checkpoint,
        fault_plan=args.fault_plan,
        num_distributed_optimizer_instances=cfg.ddp.num_distributed_optimizer_instances
        if given else None, **args.parts)


def describe(cfg: Any) -> str:
    """The resulting config as YAML (Bridge's fields, then the checkpointless parts)."""
    from dataclasses import asdict

    from megatron.bridge.training.utils.omegaconf_utils import create_omegaconf_dict_config
    from omegaconf import OmegaConf

    tree, _ = create_omegaconf_dict_config(cfg)
    ck = cfg.checkpointless
    extra = OmegaConf.create({"checkpointless": {**asdict(ck.parts),
                                                 "checkpoint": asdict(ck.checkpoint)},
                              "fault": {"plan": list(ck.fault_plan)}})
    return OmegaConf.to_yaml(tree) + OmegaConf.to_yaml(extra)


def run(args: Args, run_dir: str) -> Optional[dict[str, Any]]:
    """Train on this rank, under whichever launcher started it."""
    from ..logs import setup_logging
    from .run import prepare
    from .run import run as run_on_this_rank

    spare = os.environ.get("NCL_SPARE") == "1"
    setup_logging("spare" if spare else os.environ.get("RANK", "0"))
    prepare()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return run_on_this_rank(build_config(args, world_size=world), run_dir)
