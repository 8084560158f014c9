"""``python -m nemo_checkpointless.plan [--verbose] [--json] <hydra overrides>``

Plans the layout of ``trainer.num_nodes`` x ``trainer.devices`` ranks for the composed
config: replica sets, survivable losses, replica memory. Exit code 2 for a layout that
cannot run (the message says what to set).
"""

from __future__ import annotations

import json
import sys
import warnings

from ..config import ConfigError, compose

USAGE = ("usage: python -m nemo_checkpointless.plan [--verbose] [--json] recipe=<name> "
         "trainer.num_nodes=<N> trainer.devices=<ranks per node> [other overrides]")


def main(argv: list[str]) -> int:
    flags = {a for a in argv if a.startswith("--")}
    unknown = flags - {"--verbose", "--json", "--help"}
    if "--help" in flags or unknown:
        print(USAGE, file=sys.stderr)
        if unknown:
            print(f"error: unknown option {sorted(unknown)[0]}", file=sys.stderr)
        return 0 if not unknown else 2
    overrides = [a for a in argv if not a.startswith("--")]
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")  # megatron's import
    from . import plan_layout, render

    try:
        cfg = compose(overrides)
        world = cfg.trainer.num_nodes * cfg.trainer.devices
        plan = plan_layout(cfg, world, cfg.trainer.devices)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "--json" in flags:
        print(json.dumps(plan.to_dict()))
    else:
        print(render(plan, verbose="--verbose" in flags))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
