"""Pre-train a GPT/Llama model on megatron-core from a Hydra recipe.

    torchrun --nproc-per-node 4 recipes/pretrain.py recipe=tiny_gpt \
        strategy.tensor_model_parallel_size=2 trainer.max_steps=20 hydra.run.dir=/tmp/run

See conf/ for the recipes and nemo_checkpointless/config.py for every key.
"""

from __future__ import annotations

import os
import sys

from nemo_checkpointless import allocator

allocator.reexec_if_needed()  # CPU rehearsal: tcmalloc/jemalloc for glibc malloc (may re-exec)

import hydra  # noqa: E402  (after the allocator: a re-execution should not import twice)
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from nemo_checkpointless.config import (  # noqa: E402
    ConfigError, check_overrides, register_configs)


def _hydra_subdir() -> str | None:
    """Only rank 0 writes Hydra's .hydra/ record into the shared run directory."""
    return ".hydra" if os.environ.get("RANK", "0") == "0" else None


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from nemo_checkpointless.runtime import run_pretrain

    run_pretrain(cfg, run_dir=HydraConfig.get().runtime.output_dir)
    if os.environ.get("NCL_AGENT_FD") is not None:
        # under ncl-launch: groups aborted during recoveries are parked, not shut down;
        # leave without running their destructors (they can block at interpreter exit)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    try:
        check_overrides(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    OmegaConf.register_new_resolver("ncl_hydra_subdir", _hydra_subdir, replace=True)
    register_configs()
    main()
