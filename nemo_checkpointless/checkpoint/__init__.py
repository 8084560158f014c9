"""Durable checkpoints in megatron-core's format, and resuming a new job from them.

Written with megatron-core's ``dist_checkpointing`` (torch_dist backend): the model
chunks' and the DistributedOptimizer's own sharded state dicts (fp32 main params, Adam
moments, step; ``dp_reshardable``), plus this package's step state (step, consumed
samples, the caller's extra state in ``common.pt``; each rank's RNG snapshot as a
ShardedObject). Stock megatron-core (and NeMo / Megatron-Bridge tools built on it) loads
them with ``dist_checkpointing.load``.

API (every call below is collective unless said otherwise: call it on every rank)::

    ckpt = DurableCheckpointer(root, interval_steps=100, interval_minutes=None, keep=2)
    ckpt.maybe_save(step, model_chunks, optimizer,
                    extra_state={"consumed_samples": ..., ...}, rank_state=rng)
    ckpt.wait()      # local, the save in flight is on disk (rank 0: manifest written)
    ckpt.settle()    # after a recovery rebuilt the groups, before looking or saving
    info = latest_verified(root)           # CheckpointInfo or None, same on every rank
    restored = load(info, model_chunks, optimizer)   # in place; .extra_state, .rank_state

Files: ``snapshot.py`` (what is saved, host snapshot), ``checkpointer.py`` (schedule,
the blocking half), ``writer.py`` (the background half), ``manifest.py`` (completeness,
checksums, pruning), ``restore.py`` (choice and load), ``config.py`` (``checkpoint.*``).
"""

from .checkpointer import DurableCheckpointer
from .config import CheckpointConfig
from .manifest import CheckpointInfo, ManifestError
from .restore import CheckpointLayoutError, Restored, latest_verified, load

__all__ = [
    "CheckpointConfig",
    "CheckpointInfo",
    "CheckpointLayoutError",
    "DurableCheckpointer",
    "ManifestError",
    "Restored",
    "latest_verified",
    "load",
]
