"""Run a NeMo 2 recipe with checkpointless swapped in (needs .venv-nemo: `make venv-nemo`).

    .venv-nemo/bin/python recipes/nemo_pretrain.py recipe=llama3_70b --dryrun \\
        trainer.num_nodes=16 trainer.devices=8 strategy.tensor_model_parallel_size=8
    .venv-nemo/bin/torchrun --nproc-per-node 2 recipes/nemo_pretrain.py recipe=tiny_llama \\
        trainer.max_steps=8 run_dir=/tmp/run
    .venv-nemo/bin/python -m nemo_checkpointless.launch.agent --nproc-per-node 2 --spares 1 \\
        recipes/nemo_pretrain.py recipe=tiny_llama run_dir=/tmp/run log.log_dir=/tmp/run/log

``recipe=<name>`` is any module of ``nemo.collections.llm.recipes`` with a
``pretrain_recipe`` (``llama3_8b``, ``llama3_70b``, ...), ``tiny_llama`` (a CPU-sized
Llama, ``nemo_checkpointless/nemo/tiny_llama.py``), or ``module:function`` returning a
recipe the user built (``run.Partial``). Overrides use NeMo's names (``strategy.*`` is
``trainer.strategy``); ``data=pretraining data.paths=[PREFIX]`` swaps in NeMo's
``PreTrainingDataModule`` on a Megatron indexed dataset (``scripts/data/build_dataset.py``);
``checkpointless=<tier>`` picks the tier (default tier4), ``fault.plan=[...]`` injects
faults, ``run_dir=`` is where metrics.jsonl, events.jsonl and summary.json go. ``--dryrun``
prints the resulting recipe and exits. Under ``ncl-launch`` each rank recovers in process
(``nemo_checkpointless/nemo/session.py``).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

USAGE = ("usage: nemo_pretrain.py recipe=<name|module:function> [--dryrun] "
         "[checkpointless=<tier>] [fault.plan=[...]] [run_dir=<dir>] [data=pretraining] "
         "[strategy.<arg>=<v>] [trainer.<arg>=<v>] [data.<arg>=<v>] ...")
OWN_KEYS = ("recipe", "checkpointless", "fault.plan", "run_dir", "data")
DATA_MODULES = ("mock", "pretraining")


def split_args(argv: list[str]) -> tuple[dict[str, str], list[str], bool]:
    own: dict[str, str] = {}
    rest: list[str] = []
    dryrun = False
    for arg in argv:
        if arg in ("--dryrun", "--dry-run"):
            dryrun = True
        elif "=" in arg and arg.split("=", 1)[0] in OWN_KEYS:
            key, value = arg.split("=", 1)
            own[key] = value
        elif "=" in arg:
            rest.append(arg)
        else:
            raise SystemExit(f"error: cannot read argument {arg!r}\n{USAGE}")
    if "recipe" not in own:
        raise SystemExit(f"error: recipe=<name> is required\n{USAGE}")
    if own.get("data", "mock") not in DATA_MODULES:
        raise SystemExit(f"error: data={own['data']!r}: use one of {', '.join(DATA_MODULES)} "
                         "(data.<arg>=<value> sets an argument of the data module)")
    if own.get("data") == "pretraining" and not any(a.startswith("data.paths=") for a in rest):
        raise SystemExit("error: data=pretraining needs data.paths=[PREFIX,...] (a Megatron "
                         "indexed dataset: scripts/data/build_dataset.py writes PREFIX.bin "
                         "and PREFIX.idx)")
    return own, rest, dryrun


def load_recipe(name: str) -> Any:
    if name == "tiny_llama":
        from nemo_checkpointless.nemo import tiny_llama

        return tiny_llama.pretrain_recipe()
    if ":" in name:
        from nemo_checkpointless.nemo.run import load

        return load(name)
    try:
        module = importlib.import_module(f"nemo.collections.llm.recipes.{name}")
    except ModuleNotFoundError:
        raise SystemExit(f"error: recipe={name!r}: no module nemo.collections.llm.recipes."
                         f"{name} (try llama3_8b, llama3_70b, tiny_llama or "
                         "module:function)") from None
    if not hasattr(module, "pretrain_recipe"):
        raise SystemExit(f"error: recipe={name!r} has no pretrain_recipe()")
    return module.pretrain_recipe()


def build(argv: list[str]) -> tuple[Any, dict[str, str], bool]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from nemo_checkpointless.config import ConfigError
    from nemo_checkpointless.nemo import apply_checkpointless, apply_overrides
    from nemo_checkpointless.nemo.recipe import pretraining_data

    own, overrides, dryrun = split_args(argv)
    plan = []
    if "fault.plan" in own:
        plan = OverridesParser.create().parse_overrides([f"p={own['fault.plan']}"])[0].value()
    recipe = load_recipe(own["recipe"])
    try:
        if own.get("data") == "pretraining":
            pretraining_data(recipe, paths=[])
        recipe = apply_checkpointless(recipe, tier=own.get("checkpointless", "tier4"),
                                      fault_plan=plan, run_dir=own.get("run_dir"))
        recipe = apply_overrides(recipe, overrides)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    return recipe, own, dryrun


def main(argv: list[str]) -> int:
    recipe, own, dryrun = build(argv)
    if dryrun:
        print(recipe)
        return 0
    from nemo_checkpointless.config import ConfigError
    from nemo_checkpointless.nemo.run import run_recipe

    try:
        run_recipe(recipe, own.get("run_dir"))
    except ConfigError as err:  # found once the job's world is known: exit 2 (bad config)
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from nemo_checkpointless import allocator

    allocator.reexec_if_needed()  # CPU rehearsal: tcmalloc/jemalloc for glibc malloc
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1:]))
