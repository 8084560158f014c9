"""Worker for test_plan_groups.py (launched by torchrun): for each layout given as a JSON
list of override lists, run megatron's initialize_model_parallel through
``parallel.initialize`` and print the groups it built, this rank's shard key and the
parameters this rank holds (model built on the meta device)."""

from __future__ import annotations

import json
import sys

import torch.distributed as dist


def groups_of_this_rank(use_distributed_optimizer: bool) -> dict:
    from megatron.core import parallel_state as ps

    from nemo_checkpointless.megatron.shards import shard_key

    def ranks(group):
        return None if group is None else dist.get_process_group_ranks(group)

    return {
        "tp": ranks(ps.get_tensor_model_parallel_group()),
        "pp": ranks(ps.get_pipeline_model_parallel_group()),
        "dp_cp": ranks(ps.get_data_parallel_group(with_context_parallel=True)),
        "intra_instance": ranks(ps.get_data_parallel_group(with_context_parallel=True,
                                                           partial_data_parallel=True)),
        "inter_instance": ranks(ps.get_inter_distributed_optimizer_instance_group(
            check_initialized=False)),
        "shard_key": list(shard_key(use_distributed_optimizer)),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
    }


def local_parameters(cfg) -> int | None:
    """Parameters of this rank's model chunks (None with CP>1: needs TE attention)."""
    from nemo_checkpointless.megatron.model import build_model_chunks, count_parameters

    if cfg.strategy.context_parallel_size > 1:
        return None
    chunks = build_model_chunks(cfg.model, cfg.strategy, cfg.data.seq_length, meta=True)
    return count_parameters(chunks)


def main() -> None:
    from nemo_checkpointless import cpu
    from nemo_checkpointless.comm.world import init_world
    from nemo_checkpointless.config import compose
    from nemo_checkpointless.megatron import parallel

    cpu.enable()
    init_world("gloo")
    for index, overrides in enumerate(json.loads(sys.argv[1])):
        cfg = compose(overrides)
        parallel.initialize(cfg.strategy)
        result = groups_of_this_rank(cfg.strategy.use_distributed_optimizer)
        result.update(layout=index, rank=dist.get_rank(), params=local_parameters(cfg))
        print("RESULT " + json.dumps(result), flush=True)
        parallel.destroy()
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
