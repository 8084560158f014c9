"""Parameter counts of a recipe's model, built on the meta device (no memory, no GPU).

    python -m nemo_checkpointless.megatron.sizes recipe=llama3_70b
"""

from __future__ import annotations

import sys

from ..config import ModelConfig, StrategyConfig, compose


def count_model_parameters(model: ModelConfig, seq_length: int) -> int:
    """Total parameters of ``model`` (unsharded), built with megatron's GPTModel on meta.

    Needs no process group from the caller: a one-rank gloo world is started if none is.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from .. import cpu
    from ..comm.world import init_world
    from .model import build_model_chunks, count_parameters

    cpu.enable()
    if not dist.is_initialized():
        init_world("gloo")
    strategy = StrategyConfig()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    chunks = build_model_chunks(model, strategy, seq_length, meta=True)
    return count_parameters(chunks)


def main(argv: list[str]) -> None:
    cfg = compose(argv)
    total = count_model_parameters(cfg.model, cfg.data.seq_length)
    published = cfg.model.published_num_params
    print(f"{cfg.name}: {total:,} parameters" +
          (f" (published {published:,})" if published else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
