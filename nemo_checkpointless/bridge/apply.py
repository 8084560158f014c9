"""Swap checkpointless into a Megatron-Bridge ConfigContainer; overrides with Bridge's names.

    from megatron.bridge.recipes.llama import llama3_70b_pretrain_config
    from nemo_checkpointless.bridge import apply_checkpointless

    cfg = apply_checkpointless(llama3_70b_pretrain_config(), tier="tier4", world_size=64)

:func:`apply_checkpointless` changes exactly one Bridge setting and keeps every other:

* ``ddp.num_distributed_optimizer_instances``: 2 when lost state comes from peers
  (``recovery: peers``, tier 4: a peer replica of every optimizer shard) where data x
  context parallelism is even, unless given;

and attaches the checkpointless parts as ``cfg.checkpointless`` (a
:class:`BridgeCheckpointless`: the core's typed parts, ``config.CheckpointlessConfig``, from
the tier's preset; the core's durable checkpoints, ``config.CheckpointConfig``; the fault
plan; the run directory), which the step driver (``bridge/driver.py``) and the entry points
read. Bridge ignores the attribute (it is no dataclass field of ConfigContainer).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from ..config import (CheckpointConfig, CheckpointlessConfig, ConfigError, check_layout,
                      validate_checkpoint)

log = logging.getLogger(__name__)

# parts a Bridge run reads (rootless start-up is what ncl-launch's agents do anyway; the
# data cache is the lean loop's data path: Bridge keeps its own)
BRIDGE_PARTS = ("recovery", "fallback", "interrupt")
# the core's layout keys, as a Bridge ConfigContainer spells them
_BRIDGE_KEYS = {
    "strategy.tensor_model_parallel_size": "model.tensor_model_parallel_size",
    "strategy.pipeline_model_parallel_size": "model.pipeline_model_parallel_size",
    "strategy.virtual_pipeline_model_parallel_size": "model.virtual_pipeline_model_parallel_size",
    "strategy.context_parallel_size": "model.context_parallel_size",
    "strategy.num_distributed_optimizer_instances": "ddp.num_distributed_optimizer_instances",
    "strategy.use_distributed_optimizer": "ddp.use_distributed_optimizer",
    "trainer.num_nodes * trainer.devices": "nodes * ranks per node",
    "strategy.": "model.",
}


@dataclass
class BridgeCheckpointless:
    """The checkpointless parts of a Bridge run (``cfg.checkpointless``).

    ``checkpoint``: the core's durable checkpoints (megatron's ``torch_dist`` format), with
    the core's defaults: under ncl-launch every 100 steps unless ``interval`` says
    otherwise (0: off). Tier 3 and ``fallback: disk`` roll back to them in process, and a
    new ncl-launch job in the same run directory resumes from the newest (a Bridge
    checkpoint is resumed by Bridge's own launch). Bridge's own saves (``checkpoint.save``,
    ``save_interval``) happen beside them, decided by Bridge's loop.
    """

    parts: CheckpointlessConfig
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault_plan: list[Any] = field(default_factory=list)
    run_dir: Optional[str] = None

    @property
    def tier(self) -> str:
        return self.parts.tier



def check_parts(parts: CheckpointlessConfig, checkpoint: CheckpointConfig) -> None:
    """Raise ConfigError with the fix for parts a Bridge run cannot honour."""
    if parts.recovery == "none" and (parts.rootless_startup or parts.data_cache.enabled):
        raise ConfigError(
            f"checkpointless={parts.tier!r} turns on only parts of the lean loop (rootless "
            "start-up, data cache) without in-process recovery; a Bridge recipe keeps its own "
            "start-up and data path: use off, tier3 (recovery from disk) or tier4 (from peers)")
    validate_checkpoint(checkpoint)
    rollback = parts.recovery == "disk" or parts.fallback == "disk"
    if rollback and checkpoint.interval == 0 and checkpoint.interval_minutes is None:
        raise ConfigError(
            f"checkpointless recovery={parts.recovery} fallback={parts.fallback} rolls back to "
            "the core's latest durable checkpoint, but checkpointless.checkpoint.interval=0 "
            "turns them off: set checkpointless.checkpoint.interval (steps) or "
            "checkpointless.checkpoint.interval_minutes")


def apply_checkpointless(cfg: Any, tier: str = "tier4", *, world_size: Optional[int] = None,
                         num_distributed_optimizer_instances: Optional[int] = None,
                         checkpoint: Optional[CheckpointConfig] = None,
                         fault_plan: Optional[Sequence[Any]] = None,
                         run_dir: Optional[str] = None, **parts: Any) -> Any:
    """Return ``cfg`` (changed in place) with the checkpointless parts wired in.

    ``tier``: the preset of parts (``off``, ``tier3``, ``tier4``); ``parts`` override single
    fields of it (``fallback="disk"``, ``interrupt="on"``). ``world_size``: the job's ranks,
    when known; then peer recovery sets 2 optimizer instances only where data x context
    parallelism is even (else it keeps the recipe's count and says which ranks no peer can
    restore), and the layout is checked now.
    """
    _require_container(cfg)
    unknown = sorted(set(parts) - {f.name for f in dataclasses.fields(CheckpointlessConfig)})
    if unknown or "tier" in parts:
        raise ConfigError(f"unknown checkpointless part(s) {', '.join(unknown or ['tier'])}: "
                          f"a Bridge run reads {', '.join(BRIDGE_PARTS)}")
    chosen = CheckpointlessConfig.preset(tier, **parts)
    durable = checkpoint or CheckpointConfig()
    check_parts(chosen, durable)
    restart = getattr(cfg, "inprocess_restart", None)
    if chosen.recovery != "none" and restart is not None and getattr(restart, "enabled", False):
        raise ConfigError("inprocess_restart.enabled=true: nvidia-resiliency-ext's in-process "
                          "restart and checkpointless recovery both own the process groups; "
                          "set inprocess_restart.enabled=false.")
    ddp = cfg.ddp
    current = int(getattr(ddp, "num_distributed_optimizer_instances", 1) or 1)
    if num_distributed_optimizer_instances is None and chosen.recovery == "peers":
        num_distributed_optimizer_instances = max(2, current)
        if world_size is not None and _dp_cp(cfg, world_size) % num_distributed_optimizer_instances:
            log.warning("recovery from peers on %d ranks: data x context parallel size %d is "
                        "odd, so the optimizer shards keep %d instance(s) and have no peer "
                        "replica (set checkpointless.fallback=disk to restore them from disk)",
                        world_size, _dp_cp(cfg, world_size), current)
            num_distributed_optimizer_instances = current
    if num_distributed_optimizer_instances is not None:
        ddp.num_distributed_optimizer_instances = int(num_distributed_optimizer_instances)
    cfg.checkpointless = BridgeCheckpointless(parts=chosen, checkpoint=durable,
                                              fault_plan=list(fault_plan or []),
                                              run_dir=run_dir)
    if world_size is not None:
        check_bridge_layout(cfg, world_size)
    return cfg


def checkpointless_of(cfg: Any) -> BridgeCheckpointless:
    """``cfg.checkpointless``, or the ``off`` parts for a recipe never passed through
    :func:`apply_checkpointless`."""
    found = getattr(cfg, "checkpointless", None)
    if isinstance(found, BridgeCheckpointless):
        return found
    return BridgeCheckpointless(parts=CheckpointlessConfig.preset("off"))


def _require_container(cfg: Any) -> None:
    from megatron.bridge.training.config import ConfigContainer

    if not isinstance(cfg, ConfigContainer):
        raise ConfigError(f"apply_checkpointless needs a Megatron-Bridge ConfigContainer (from "
                          f"megatron.bridge.recipes.<model>_pretrain_config()), not "
                          f"{type(cfg).__name__}.")


def _dp_cp(cfg: Any, world_size: int) -> int:
    m = cfg.model
    return world_size // (int(m.tensor_model_parallel_size) * int(m.pipeline_model_parallel_size))


def check_bridge_layout(cfg: Any, world_size: int) -> None:
    """The core's layout check on a Bridge config; the message names Bridge's keys."""
    m, ddp = cfg.model, cfg.ddp
    # the embedding and the loss may count as pipeline layers; a custom layout splits alone
    layers = None if getattr(m, "pipeline_model_parallel_layout", None) is not None else (
        m.num_layers + int(bool(getattr(m, "account_for_embedding_in_pipeline_split", False)))
        + int(bool(getattr(m, "account_for_loss_in_pipeline_split", False))))
    try:
        check_layout(world_size=world_size, tp=int(m.tensor_model_parallel_size),
                     pp=int(m.pipeline_model_parallel_size),
                     cp=int(m.context_parallel_size or 1),
                     vp=m.virtual_pipeline_model_parallel_size,
                     instances=int(ddp.num_distributed_optimizer_instances or 1),
                     distributed_optimizer=bool(ddp.use_distributed_optimizer),
                     num_layers=layers, heads=m.num_attention_heads,
                     query_groups=m.num_query_groups or m.num_attention_heads)
    except ConfigError as err:
        text = str(err)
        for core, bridge in _BRIDGE_KEYS.items():
            text = text.replace(core, bridge)
        raise ConfigError(text) from None


# ---------------------------------------------------------------------- overrides
def apply_overrides(cfg: Any, overrides: Iterable[str]) -> Any:
    """Hydra-grammar ``key=value`` overrides with Bridge's own names, applied by Bridge's
    own ``process_config_with_overrides`` (``model.tensor_model_parallel_size=2``,
    ``train.global_batch_size=64``, ``optimizer.lr=1e-4``, ``scheduler.lr_warmup_iters=10``,
    ``dataset.sequence_length=...``). A key that names no field fails with the closest
    names."""
    items = list(overrides)
    if not items:
        return cfg
    from megatron.bridge.training.utils.omegaconf_utils import (
        OverridesError, create_omegaconf_dict_config, process_config_with_overrides)

    tree, _ = create_omegaconf_dict_config(cfg)
    for item in items:
        _check_key(tree, item)
    checkpointless = getattr(cfg, "checkpointless", None)
    try:
        cfg = process_config_with_overrides(cfg, cli_overrides=items)
    except OverridesError as err:
        raise ConfigError(f"{err}") from None
    if checkpointless is not None:
        cfg.checkpointless = checkpointless
    return cfg


def _check_key(tree: Any, override: str) -> None:
    key = override.split("=", 1)[0].lstrip("+~")
    node = tree
    parts = key.split(".")
    for depth, name in enumerate(parts):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if name not in keys:
            where = ".".join(parts[:depth]) or "the config"
            close = difflib.get_close_matches(name, [str(k) for k in keys], n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown override '{key}': {where} has no field '{name}'.{hint}")
        node = node[name]
        if node is None or not hasattr(node, "keys"):
            if depth < len(parts) - 1:
                raise ConfigError(f"unknown override '{key}': "
                                  f"{'.'.join(parts[:depth + 1])} has no fields")
            return
