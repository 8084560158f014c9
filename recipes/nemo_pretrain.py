"""Run a NeMo 2 recipe with checkpointless swapped in (needs .venv-nemo: `make venv-nemo`).

    .venv-nemo/bin/python recipes/nemo_pretrain.py recipe=llama3_70b --dryrun \
        trainer.num_nodes=16 trainer.devices=8 strategy.tensor_model_parallel_size=8
    .venv-nemo/bin/torchrun --nproc-per-node 2 recipes/nemo_pretrain.py recipe=tiny_llama \
        trainer.max_steps=6 run_dir=/tmp/run

``recipe=<name>`` is any module of ``nemo.collections.llm.recipes`` with a
``pretrain_recipe`` (``llama3_8b``, ``llama3_70b``, ...) or ``tiny_llama`` (a CPU-sized
Llama, ``nemo_checkpointless/nemo/tiny_llama.py``). Overrides use NeMo's names
(``strategy.*`` is ``trainer.strategy``); ``checkpointless=<tier>`` picks the tier
(default tier4), ``fault.plan=[...]`` injects faults, ``run_dir=`` is where metrics.jsonl
goes. ``--dryrun`` prints the resulting recipe and exits.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

USAGE = ("usage: nemo_pretrain.py recipe=<name> [--dryrun] [checkpointless=<tier>] "
         "[fault.plan=[...]] [run_dir=<dir>] [strategy.<arg>=<v>] [trainer.<arg>=<v>] ...")
OWN_KEYS = ("recipe", "checkpointless", "fault.plan", "run_dir")


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
    return own, rest, dryrun


def load_recipe(name: str) -> Any:
    if name == "tiny_llama":
        from nemo_checkpointless.nemo import tiny_llama

        return tiny_llama.pretrain_recipe()
    try:
        module = importlib.import_module(f"nemo.collections.llm.recipes.{name}")
    except ModuleNotFoundError:
        raise SystemExit(f"error: recipe={name!r}: no module nemo.collections.llm.recipes."
                         f"{name} (try llama3_8b, llama3_70b or tiny_llama)") from None
    if not hasattr(module, "pretrain_recipe"):
        raise SystemExit(f"error: recipe={name!r} has no pretrain_recipe()")
    return module.pretrain_recipe()


def build(argv: list[str]) -> tuple[Any, bool]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from nemo_checkpointless.config import ConfigError
    from nemo_checkpointless.nemo import apply_checkpointless, apply_overrides

    own, overrides, dryrun = split_args(argv)
    plan = []
    if "fault.plan" in own:
        plan = OverridesParser.create().parse_overrides([f"p={own['fault.plan']}"])[0].value()
    recipe = load_recipe(own["recipe"])
    try:
        recipe = apply_checkpointless(recipe, tier=own.get("checkpointless", "tier4"),
                                      fault_plan=plan, run_dir=own.get("run_dir"))
        recipe = apply_overrides(recipe, overrides)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    return recipe, dryrun


def main(argv: list[str]) -> int:
    recipe, dryrun = build(argv)
    if dryrun:
        print(recipe)
        return 0
    import fiddle as fdl

    from nemo_checkpointless import cpu
    from nemo_checkpointless.launch.channel import Channel

    cpu.enable()  # no-op with CUDA
    channel = Channel.from_env()
    if channel is not None:  # started by ncl-launch: the recovery manager drives the steps
        from nemo_checkpointless.nemo.driver import run_recipe_under_agent
        from nemo_checkpointless.logs import setup_logging

        setup_logging("spare" if os.environ.get("NCL_SPARE") == "1"
                      else os.environ.get("RANK", "0"))
        own, _, _ = split_args(argv)
        run_recipe_under_agent(recipe, own.get("run_dir"), channel)
        return 0
    fdl.build(recipe)()
    return 0


if __name__ == "__main__":
    from nemo_checkpointless import allocator

    allocator.reexec_if_needed()  # CPU rehearsal: tcmalloc/jemalloc for glibc malloc
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1:]))
