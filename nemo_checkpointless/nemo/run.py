"""Run a NeMo 2 recipe (a ``run.Partial``) as it is, with in-process recovery under ncl-launch.

Every rank runs the recipe the user built; :func:`run_recipe` opens the rank's recovery
session first (a warm spare waits there for the rank it replaces), then builds the
recipe and calls it (``llm.pretrain`` -> Lightning's ``fit``). Without ``ncl-launch``
it builds and calls the recipe as NeMo-Run would (torchrun: no recovery).

From the command line (``ncl-launch`` runs this file on each rank), the recipe is

* NeMo-Run's serialized form (what ``nemo_run.core.runners.fdl_runner`` receives: the
  string, or a file holding it), e.g. from the :class:`~.launcher.NclLaunch` launcher;
* ``module:function``: a function returning the recipe (``my_recipes:llama_70b``);

    ncl-launch --nproc-per-node 8 --spares 1 nemo_checkpointless/nemo/scripts/run_recipe.py \\
        my_recipes:llama_70b [--run-dir DIR]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any, Optional

import fiddle as fdl

from nemo_checkpointless.config import (CheckpointConfig, CheckpointlessConfig, ConfigError,
                                        DataConfig, FaultConfig, ModelConfig, RunConfig,
                                        StrategyConfig, TrainerConfig)


def run_config(recipe: Any, world_size: Optional[int] = None) -> RunConfig:
    """The core settings the recovery loop reads, taken from a checkpointless recipe.

    The recovery parts are the strategy's tier preset (``fallback`` on top). NeMo's own
    checkpoints (``ModelCheckpoint``, loaded by ``AutoResume``) are the job's durable ones,
    so the core's are off; and so recovery comes from peers: a rollback to disk inside
    Lightning's loop is not supported (a new job resumes from NeMo's checkpoint instead).
    ``world_size``: the job's, for the strict layout check at start-up.
    """
    from nemo_checkpointless.nemo.recipe import check_layout, uses_distributed_optimizer
    from nemo_checkpointless.nemo.strategy import CheckpointlessMegatronStrategy

    strategy = recipe.trainer.strategy
    target = getattr(strategy, "__fn_or_cls__", None)
    if not (isinstance(target, type) and issubclass(target, CheckpointlessMegatronStrategy)):
        raise ConfigError("the recipe's trainer.strategy is not CheckpointlessMegatronStrategy: "
                          "pass it through nemo_checkpointless.nemo.apply_checkpointless(recipe) "
                          "first")
    args = fdl.ordered_arguments(strategy)
    parts = CheckpointlessConfig.preset(args.get("tier", "tier4"),
                                        fallback=args.get("fallback", "none"))
    if parts.recovery == "none":
        raise ConfigError(
            f"tier={parts.tier}: under ncl-launch a NeMo job recovers in process, which needs "
            "tier4; launch it with torchrun for a run without recovery")
    if parts.recovery == "disk" or parts.fallback == "disk":
        raise ConfigError(
            f"tier={parts.tier}, fallback={parts.fallback}: a NeMo job under ncl-launch "
            "recovers from peers only (tier4 with fallback='none'); to go back to a "
            "checkpoint, start a new job: NeMo's AutoResume loads ModelCheckpoint's last one")
    if world_size is not None:
        check_layout(recipe, world_size)
    model = recipe.model.config
    data = recipe.data
    trainer = recipe.trainer
    return RunConfig(
        name="nemo",
        model=ModelConfig(num_layers=model.num_layers, hidden_size=model.hidden_size,
                          ffn_hidden_size=model.ffn_hidden_size,
                          num_attention_heads=model.num_attention_heads,
                          num_query_groups=model.num_query_groups),
        strategy=StrategyConfig(
            tensor_model_parallel_size=args.get("tensor_model_parallel_size", 1) or 1,
            pipeline_model_parallel_size=args.get("pipeline_model_parallel_size", 1) or 1,
            virtual_pipeline_model_parallel_size=args.get(
                "virtual_pipeline_model_parallel_size"),
            context_parallel_size=args.get("context_parallel_size", 1) or 1,
            sequence_parallel=bool(args.get("sequence_parallel", False)),
            use_distributed_optimizer=uses_distributed_optimizer(recipe),
            num_distributed_optimizer_instances=int(
                args.get("num_distributed_optimizer_instances", 1) or 1)),
        data=DataConfig(global_batch_size=data.global_batch_size,
                        micro_batch_size=data.micro_batch_size, seq_length=data.seq_length),
        trainer=TrainerConfig(max_steps=trainer.max_steps, devices=trainer.devices,
                              num_nodes=trainer.num_nodes),
        checkpointless=parts,
        checkpoint=CheckpointConfig(interval=0, resume="never"),  # NeMo's own (above)
        fault=FaultConfig(plan=list(args.get("fault_plan", None) or [])),
    )


def run_dir_of(recipe: Any, run_dir: Optional[str] = None) -> Path:
    """Where the job's record goes (events, metrics, summary): ``run_dir``, else the
    checkpointless callback's, else the NeMo log directory, else the working directory.
    The callback is pointed at it, so both write to the same place."""
    from nemo_checkpointless.nemo.callbacks import CheckpointlessCallback

    callbacks = getattr(recipe.trainer, "callbacks", None) or []
    ours = [c for c in callbacks if getattr(c, "__fn_or_cls__", None) is CheckpointlessCallback]
    log = getattr(recipe, "log", None)
    root = run_dir or (ours[0].run_dir if ours else None) or getattr(log, "log_dir", None) \
        or os.getcwd()
    for callback in ours:
        callback.run_dir = str(root)
    return Path(root)


def run_recipe(recipe: Any, run_dir: Optional[str] = None) -> Any:
    """Build and call ``recipe`` on this rank (see the module docstring)."""
    from nemo_checkpointless import cpu
    from nemo_checkpointless.launch.channel import Channel
    from nemo_checkpointless.runtime import require_supported_megatron

    channel = Channel.from_env()
    cpu.enable()  # no-op with CUDA
    require_supported_megatron()
    if channel is None:
        return fdl.build(recipe)()
    from nemo_checkpointless.logs import setup_logging
    from nemo_checkpointless.nemo.session import CheckpointlessSession

    cfg = run_config(recipe, int(os.environ["WORLD_SIZE"]))
    root = run_dir_of(recipe, run_dir)
    setup_logging("spare" if os.environ.get("NCL_SPARE") == "1" else os.environ.get("RANK", "0"))
    session = CheckpointlessSession.open(cfg, root, channel)
    result = fdl.build(recipe)()
    session.close()
    return result


def load(spec: str) -> Any:
    """A recipe from NeMo-Run's serialized form (string or file) or ``module:function``."""
    from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer

    text = spec
    if os.path.isfile(spec):
        text = Path(spec).read_text().strip()
    elif ":" in spec and not spec.startswith("eJ"):
        module, _, name = spec.partition(":")
        target = getattr(importlib.import_module(module), name)
        return target() if callable(target) and not isinstance(target, fdl.Buildable) \
            else target
    try:
        return ZlibJSONSerializer().deserialize(text)
    except Exception as err:  # noqa: BLE001 - said plainly below
        raise SystemExit(f"error: {spec[:80]!r} is neither NeMo-Run's serialized recipe (a "
                         f"string or a file) nor module:function ({err})") from None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nemo_checkpointless.nemo.run",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--name", default="run", help="run name (as NeMo-Run's runner)")
    parser.add_argument("-p", "--package-cfg", default=None,
                        help="NeMo-Run's serialized packager (set up before the recipe runs)")
    parser.add_argument("--run-dir", default=None, help="metrics.jsonl, events, summary.json")
    parser.add_argument("--dryrun", action="store_true", help="print the recipe and exit")
    parser.add_argument("recipe", help="serialized recipe, a file holding it, or module:function")
    args = parser.parse_args(argv)
    if args.package_cfg:
        from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer

        text = Path(args.package_cfg).read_text() if os.path.isfile(args.package_cfg) \
            else args.package_cfg
        fdl.build(ZlibJSONSerializer().deserialize(text)).setup()
    recipe = load(args.recipe)
    if args.dryrun:
        print(recipe)
        return 0
    try:
        run_recipe(recipe, args.run_dir)
    except ConfigError as err:  # a bad configuration: exit 2, as the core's entry does
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
