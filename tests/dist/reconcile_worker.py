"""Worker for test_reconcile.py (launched by torchrun, 2 ranks, no agent).

Both ranks train ``lose_at`` steps; then rank 1 forgets its state (optimizer shard, model
parameters, counters and RNG scrambled, ``has_state`` False), and both run the
:class:`Reconciler` as a recovery would. Rank 1 must get every byte back from rank 0 (its
replica), and both ranks then train on to ``steps``: the result is written for the test to
compare with an uninterrupted run.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    from nemo_checkpointless import cpu
    from nemo_checkpointless.comm.world import init_world
    from nemo_checkpointless.config import compose
    from nemo_checkpointless.megatron.state import job_digest
    from nemo_checkpointless.recovery.commit import CommitProtocol
    from nemo_checkpointless.recovery.reconcile import Reconciler
    from nemo_checkpointless.state import OptimizerShard, RankState
    from nemo_checkpointless.steps import HookList
    from nemo_checkpointless.train.loop import Trainer

    run_dir, steps, lose_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    cpu.enable()
    init_world("gloo")
    rank = dist.get_rank()
    cfg = compose(sys.argv[4:])
    commit = CommitProtocol()
    trainer = Trainer(cfg, run_dir, HookList([commit]))
    trainer.setup()
    commit.start_at(0)
    state = RankState({"driver": trainer, "commit": commit,
                       "optimizer": OptimizerShard(trainer.optimizer)})
    reconciler = Reconciler(trainer, commit, state, rank=rank, world_size=dist.get_world_size(),
                            use_distributed_optimizer=True)
    reconciler.has_state = True
    losses = []
    for _ in range(lose_at):
        losses.append(trainer.train_step().loss)
    before = job_digest(trainer.model, trainer.optimizer)
    result = {}
    if lose_at and rank == 1:  # lose everything a replacement would not have
        for t in OptimizerShard(trainer.optimizer).tensors():
            t.copy_(torch.randn(t.shape).to(t.dtype) if t.is_floating_point() else t * 0)
        for chunk in trainer.model:
            for p in chunk.parameters():
                p.data.zero_()
        trainer.step, trainer.consumed_samples, trainer.last_record = 0, 0, None
        commit.load_state_dict({"step": 0, "rng": commit.rng_at[lose_at + 1]})
        torch.manual_seed(999)
        random.seed(999)
        reconciler.has_state = False
    if lose_at:
        result = reconciler.run(recovering=True)
        assert job_digest(trainer.model, trainer.optimizer) == before
    while trainer.step < steps:
        losses.append(trainer.train_step().loss)
    digest = job_digest(trainer.model, trainer.optimizer)
    if rank == 0:
        print("RESULT " + json.dumps({"losses": [float(x).hex() for x in losses],
                                      "state_sha256": digest, "reconcile": result,
                                      "step": trainer.step,
                                      "consumed": trainer.consumed_samples}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
