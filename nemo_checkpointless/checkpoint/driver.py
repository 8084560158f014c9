"""Durable checkpoints of a step driver, through the state contract.

The checkpointer takes model chunks, an optimizer and plain state; this module maps a
:class:`~nemo_checkpointless.steps.StepDriver` onto that:

* the *common* part is the driver's ``state_dict()`` (step, data position, schedule, last
  metrics record: the same on every rank), the *per-rank* part is a
  :class:`~nemo_checkpointless.state.Stateful` of the rank's own (the commit protocol's
  state under recovery: the RNG that starts the next step; :class:`~..state.RngStreams`
  otherwise);
* :class:`CheckpointHook`: a step hook that saves at ``AFTER_STEP`` when a save is due
  (the step is committed and the parameters gathered);
* :func:`resume`: find the newest verified checkpoint and load it in place (collective),
  restore both parts, and drop the rows of ``metrics.jsonl`` after the checkpoint's step
  (the job that wrote them died before a newer checkpoint; they are written again as the
  steps are redone), so the file keeps exactly one row per committed step across jobs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

from ..state import Stateful
from ..steps import Phase
from . import restore
from .checkpointer import DurableCheckpointer

log = logging.getLogger(__name__)


def extra_state(driver: Any) -> dict[str, Any]:
    """What every rank has in common after a committed step."""
    return {"consumed_samples": int(driver.consumed_samples), "driver": driver.state_dict()}


class CheckpointHook:
    """Step hook: a durable save after every due committed step.

    ``on_save(step)``: called once a save has started (snapshot taken, the write in the
    background): the fault injector's ``checkpoint`` phase.
    """

    def __init__(self, checkpointer: DurableCheckpointer, driver: Any, rank_part: Stateful,
                 on_save: Callable[[int], None] = lambda step: None) -> None:
        self.checkpointer = checkpointer
        self.driver = driver
        self.rank_part = rank_part
        self.on_save = on_save

    def on_phase(self, phase: Phase, step: int) -> None:
        if phase is Phase.AFTER_STEP:
            self.save_if_due(step)

    def save_if_due(self, step: int) -> bool:
        d = self.driver
        started = self.checkpointer.maybe_save(step, d.model, d.optimizer, extra_state(d),
                                               rank_state=self.rank_part.state_dict())
        if started:
            self.on_save(step)
        return started

    def save_now(self) -> None:
        """A save of the driver's current step outside the schedule (the start of a job,
        a stop), waited for; nothing new when that step's save already started."""
        d = self.driver
        if self.checkpointer.last_saved_step != d.step:
            self.checkpointer.save(d.step, d.model, d.optimizer, extra_state(d),
                                   rank_state=self.rank_part.state_dict())
        self.checkpointer.wait()


def load_into(info: Any, driver: Any, rank_part: Stateful) -> restore.Restored:
    """Load checkpoint ``info`` into ``driver`` and ``rank_part`` (collective)."""
    restored = restore.load(info, driver.model, driver.optimizer)
    driver.load_state_dict(restored.extra_state["driver"])
    driver.pending = None
    if restored.rank_state is not None:
        rank_part.load_state_dict(restored.rank_state)
    return restored


def resume(driver: Any, root: Path | str, rank_part: Stateful, *,
           verify_data: bool = True) -> Optional[restore.Restored]:
    """Load the newest verified checkpoint under ``root`` into ``driver`` (collective);
    None (and nothing changed) when there is none."""
    info = restore.latest_verified(root, verify_data=verify_data)
    if info is None:
        return None
    restored = load_into(info, driver, rank_part)
    metrics = getattr(driver, "metrics", None)
    dropped = metrics.truncate_after(restored.step) if metrics is not None else 0
    log.info("resumed at step %d from %s (%.2fs%s)%s", restored.step, info.path,
             restored.seconds, ", resharded" if restored.resharded else "",
             f"; {dropped} metrics rows of later steps will be redone" if dropped else "")
    return restored
