"""Worker for test_durable_*.py (launched by torchrun): train the lean loop with durable
checkpoints, optionally resuming from the latest verified one first.

    durable_worker.py RUN_DIR CKPT_ROOT INTERVAL RESUME(auto|never) [overrides...]

``DURABLE_SETTLE=S:R``: rank R writes nothing of the save of step S (as if it had died
before writing), and right after that save every rank settles, as after a recovery.

Rank 0 prints one ``RESULT {json}`` line: every step's loss_hex, the final state_sha256,
what each save cost and what the resume loaded.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist


def main() -> None:
    from nemo_checkpointless import cpu
    from nemo_checkpointless.checkpoint import DurableCheckpointer, writer
    from nemo_checkpointless.checkpoint.driver import CheckpointHook, resume
    from nemo_checkpointless.comm.world import init_world
    from nemo_checkpointless.config import compose
    from nemo_checkpointless.logs import setup_logging
    from nemo_checkpointless.state import RngStreams
    from nemo_checkpointless.train.loop import Trainer

    run_dir, root, interval, mode = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), \
        sys.argv[4]
    cpu.enable()
    init_world("gloo")
    rank = dist.get_rank()
    setup_logging(rank)
    cfg = compose(sys.argv[5:])
    trainer = Trainer(cfg, run_dir)
    trainer.setup()
    resumed = None
    if mode == "auto":
        restored = resume(trainer, root, RngStreams())
        if restored is not None:
            resumed = {"step": restored.step, "seconds": restored.seconds,
                       "resharded": restored.resharded, "checkpoint": restored.info.name}
    ckpt = DurableCheckpointer(root, interval_steps=interval or None, keep=3)
    trainer.hooks.add(CheckpointHook(ckpt, trainer, RngStreams()))
    run_save = writer.SaveJob.run
    losses, saves, settled = {}, [], []
    settle_step, drop_rank = (int(x) for x in os.environ.get("DURABLE_SETTLE", "0:-1").split(":"))
    while trainer.step < cfg.trainer.max_steps:
        if trainer.step + 1 == settle_step and rank == drop_rank:
            writer.SaveJob.run = lambda job: None  # this rank "dies" before writing
        metrics = trainer.train_step()  # the hook saves after a due step
        losses[metrics.step] = float(metrics.loss).hex()
        if ckpt.last_stats.get("step") == trainer.step:
            saves.append(dict(ckpt.last_stats))
            if os.environ.get("DURABLE_REFERENCE"):
                dump_reference(Path(os.environ["DURABLE_REFERENCE"]) / f"iter_{trainer.step:07d}",
                               trainer, rank)
            if trainer.step == settle_step:
                writer.SaveJob.run = run_save
                settled.append(ckpt.settle())
    final = ckpt.close()
    if final is not None and saves:
        saves[-1].update(final)
    summary = trainer.finish()
    if rank == 0:
        print("RESULT " + json.dumps({"losses": losses, "state_sha256": summary["state_sha256"],
                                      "saves": saves, "resumed": resumed, "settled": settled,
                                      "final_step": summary["final_step"]}), flush=True)
    dist.destroy_process_group()


def dump_reference(directory: Path, trainer, rank: int) -> None:
    """The saved tensors as megatron's own sharded state dict sees them, for the stock
    loader to compare with."""
    import torch
    from durable_stock_loader import flat_tensors

    from nemo_checkpointless.checkpoint import snapshot

    directory.mkdir(parents=True, exist_ok=True)
    sd = snapshot.state_dict(trainer.model, trainer.optimizer, is_loading=False,
                             with_rank_state=False)
    torch.save(flat_tensors(sd), directory / f"rank_{rank}.pt")


if __name__ == "__main__":
    main()
