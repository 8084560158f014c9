"""Durable checkpoints of a step driver (the lean loop's ``Trainer`` or NeMo's driver).

The checkpointer itself takes model chunks, an optimizer and plain state; this module
maps a :class:`~nemo_checkpointless.train.loop.StepDriver` onto that:

* :class:`CheckpointHook`: a step hook that calls ``maybe_save`` at ``AFTER_STEP`` (the
  step is committed and the parameters gathered), with the driver's data position,
  schedule and last metrics record as the common extra state, and the RNG that starts the
  next step as this rank's state;
* :func:`resume`: find the newest verified checkpoint and load it into the driver
  (collective), restoring step, data position, schedule, last record and RNG, and drop
  the rows of ``metrics.jsonl`` after the checkpoint's step (the job that wrote them died
  before a newer checkpoint; they are written again as the steps are redone), so the
  file keeps exactly one row per committed step across jobs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from ..train.hooks import Phase
from . import restore
from .checkpointer import DurableCheckpointer

log = logging.getLogger(__name__)


def extra_state(driver: Any) -> dict[str, Any]:
    """What every rank has in common after a committed step."""
    return {"consumed_samples": int(driver.consumed_samples),
            "schedule": driver.schedule_state(), "record": driver.last_record}


class CheckpointHook:
    """Step hook: a durable save after every due committed step."""

    def __init__(self, checkpointer: DurableCheckpointer, driver: Any) -> None:
        self.checkpointer = checkpointer
        self.driver = driver

    def on_phase(self, phase: Phase, step: int) -> None:
        if phase is not Phase.AFTER_STEP:
            return
        from ..megatron.shards import capture_rng

        d = self.driver
        self.checkpointer.maybe_save(step, d.model, d.optimizer, extra_state(d),
                                     rank_state={"rng": capture_rng()})


def resume(driver: Any, root: Path | str, *, verify_data: bool = True
           ) -> Optional[restore.Restored]:
    """Load the newest verified checkpoint under ``root`` into ``driver`` (collective);
    None (and nothing changed) when there is none."""
    from ..megatron.shards import restore_rng

    info = restore.latest_verified(root, verify_data=verify_data)
    if info is None:
        return None
    restored = restore.load(info, driver.model, driver.optimizer)
    extra = restored.extra_state
    driver.step = restored.step
    driver.consumed_samples = restored.consumed_samples
    driver.load_schedule_state(extra["schedule"])
    driver.last_record = extra["record"]
    driver.pending = None
    if restored.rank_state is not None:
        restore_rng(restored.rank_state["rng"])
    metrics = getattr(driver, "metrics", None)
    dropped = metrics.truncate_after(restored.step) if metrics is not None else 0
    log.info("resumed at step %d from %s (%.2fs%s)%s", restored.step, info.path,
             restored.seconds, ", resharded" if restored.resharded else "",
             f"; {dropped} metrics rows of later steps will be redone" if dropped else "")
    return restored
