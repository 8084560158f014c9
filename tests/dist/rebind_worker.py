"""Worker for test_rebind.py (launched by torchrun): rebuild groups in place, then check
that no object reachable from the model, optimizer, scheduler or megatron's parallel state
references a destroyed group, and that the old groups are garbage."""

from __future__ import annotations

import gc
import json
import os
import sys
import weakref
from pathlib import Path

import torch.distributed as dist


def main() -> None:
    from nemo_checkpointless import cpu
    from nemo_checkpointless.comm.abort import forget_all_groups, release_forgotten_groups
    from nemo_checkpointless.comm.world import init_world
    from nemo_checkpointless.config import compose
    from nemo_checkpointless.megatron import parallel
    from nemo_checkpointless.megatron.rebind import (group_roles, rebind, stale_group_references,
                                                     stale_parallel_state_groups)
    from nemo_checkpointless.train.loop import Trainer

    cpu.enable()
    init_world("gloo")
    rank = dist.get_rank()
    cfg = compose(sys.argv[2:])
    trainer = Trainer(cfg, Path(sys.argv[1]))
    trainer.setup()
    trainer.train_step()
    old_roles = group_roles()
    old = [weakref.ref(g) for g in dist.distributed_c10d._world.pg_map]
    forget_all_groups()  # what recovery does: no shutdown() of the old groups
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False)
    dist.init_process_group("gloo", store=dist.PrefixStore("gen1/", store), rank=rank,
                            world_size=int(os.environ["WORLD_SIZE"]))
    trainer.coords = parallel.initialize(cfg.strategy)
    roots = [trainer.model, trainer.optimizer, trainer.scheduler]
    replaced = rebind(roots, old_roles)
    stale = stale_group_references(roots) + stale_parallel_state_groups()
    release_forgotten_groups()
    gc.collect()
    alive = sum(ref() is not None for ref in old)
    metrics = trainer.train_step()
    print("RESULT " + json.dumps({"rank": rank, "replaced": replaced, "stale": stale,
                                  "old_alive": alive, "old_total": len(old),
                                  "loss": metrics.loss}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
