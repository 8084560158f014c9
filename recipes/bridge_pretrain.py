"""Pre-train with a Megatron-Bridge recipe, with or without checkpointless recovery.

    # Bridge's own loop (torchrun): a CPU-sized Llama on 2 gloo ranks
    torchrun --nproc-per-node 2 recipes/bridge_pretrain.py recipe=tiny_llama \\
        train.train_iters=8 hydra.run.dir=/tmp/run
    # in-process recovery under ncl-launch, a rank killed at step 3
    python -m nemo_checkpointless.launch.agent --nproc-per-node 2 --spares 1 \\
        recipes/bridge_pretrain.py recipe=tiny_llama checkpointless=tier4 \\
        'fault.plan=[{rank:1,step:3,phase:forward,kind:kill}]' hydra.run.dir=/tmp/run
    # print Bridge's Llama 3 70B recipe as it would run
    python recipes/bridge_pretrain.py recipe=llama3_70b checkpointless=tier4 --dryrun \\
        model.tensor_model_parallel_size=8 train.global_batch_size=1024

``recipe=`` is any ``<name>_pretrain_config`` of ``megatron.bridge.recipes`` (llama3_8b,
llama3_70b, llama31_405b, ...) or ``tiny_llama``; other ``key=value`` arguments override
the recipe with Bridge's own names. See ``nemo_checkpointless/bridge/entry.py`` for the
keys, and docs/bridge.md.
"""

from __future__ import annotations

import os
import sys

# Light at the top: checkpoint saving spawns helper processes that import this file again.
BRIDGE_ARGS: list = []


def _hydra_subdir() -> str | None:
    """Only rank 0 writes Hydra's .hydra/ record into the shared run directory."""
    return ".hydra" if os.environ.get("RANK", "0") == "0" else None


def _main() -> int:
    import hydra
    from omegaconf import OmegaConf

    from nemo_checkpointless.bridge.entry import parse_args
    from nemo_checkpointless.config import ConfigError

    try:
        args = parse_args(sys.argv[1:])
        if args.dryrun:
            from nemo_checkpointless.bridge.entry import build_config, describe
            from nemo_checkpointless.bridge.run import prepare

            prepare()
            print(describe(build_config(args)))
            return 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    BRIDGE_ARGS.append(args)

    @hydra.main(version_base=None, config_path="../conf/bridge", config_name="config")
    def main(node) -> None:
        from hydra.core.hydra_config import HydraConfig

        from nemo_checkpointless.bridge.entry import run

        try:
            run(BRIDGE_ARGS[0], HydraConfig.get().runtime.output_dir)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        if os.environ.get("NCL_AGENT_FD") is not None:
            # under ncl-launch: groups aborted during recoveries are parked, not shut down;
            # leave without running their destructors (they can block at interpreter exit)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    sys.argv = [sys.argv[0], f"recipe={args.recipe}", *args.hydra]
    OmegaConf.register_new_resolver("ncl_hydra_subdir", _hydra_subdir, replace=True)
    main()
    return 0


if __name__ == "__main__":
    from nemo_checkpointless import allocator

    allocator.reexec_if_needed()  # CPU rehearsal: tcmalloc/jemalloc for glibc malloc
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(_main())
