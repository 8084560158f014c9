"""A stop on request under Megatron-Bridge: Bridge's own checkpoint of the agreed step.

The agent's ``Stop`` (SIGTERM or SIGUSR1 to ``ncl-launch``) reaches every rank's commit
barrier; every rank learns there that the job stops after the same step S. Once Bridge's
loop has done S's logging, validation and interval save (the driver's ``train_step`` for S
returned; Bridge's ``train()`` waits before S + 1), :func:`save_for_stop` has Bridge write
its checkpoint of iteration S the way its loop writes one (``save_checkpoint_and_time``:
the checkpoint manager, ``checkpoint.save``, its format, the tracker file Bridge's resume
reads), unless its ``save_interval`` wrote S already. The recovery loop then writes the
core's durable checkpoint of S (what a new ``ncl-launch`` job resumes from) and the rank
exits 143. Both are written: the core's for ``ncl-launch``'s job chain (a Slurm requeue),
Bridge's for Bridge's own resume (``checkpoint.load``, e.g. under torchrun) and Bridge's
tools. The save runs inside the recoverable region: a failure during it is recovered and
the stop is agreed again at the next step, which is then saved.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def save_for_stop(driver: Any) -> None:
    """Every rank: Bridge's checkpoint of the committed step ``driver.step`` (collective)."""
    import torch.distributed as dist

    cfg, step = driver.cfg, driver.step
    lead = dist.get_rank() == 0
    save, interval = cfg.checkpoint.save, cfg.checkpoint.save_interval
    if step >= int(cfg.train.train_iters):
        return  # the job's end: Bridge's loop wrote its final checkpoint itself
    if not save:
        if lead:
            log.warning("stopping after iteration %d without a Bridge checkpoint "
                        "(checkpoint.save is not set); the core's durable checkpoint follows",
                        step)
        return
    if interval and step % interval == 0:
        if lead:
            log.warning("stopping after iteration %d: Bridge's checkpoint of it is in %s "
                        "(written by its save_interval)", step, save)
        return
    from megatron.bridge.training import train as bridge_train

    driver.pause("bridge checkpoint for the stop")
    bridge_train.save_checkpoint_and_time(
        driver.state, driver.model, driver.optimizer, driver.scheduler,
        driver.state.train_state.floating_point_operations_so_far, driver.checkpoint_manager,
        train_data_iterator=driver.train_iterator, pg_collection=driver.pg_collection,
        callback_manager=driver.callbacks)
    driver.checkpoint_manager.finalize_async_saves(state=driver.state, blocking=True)
    if lead:
        log.warning("stopping after iteration %d: Bridge's checkpoint of it written to %s "
                    "(Bridge's resume: checkpoint.load=%s)", step, save, save)
