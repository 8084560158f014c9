"""A stop on request under NeMo 2: the agreed step ends in Lightning, then a NeMo checkpoint.

The agent's ``Stop`` (SIGTERM or SIGUSR1 to ``ncl-launch``) reaches every rank's commit
barrier, and every rank learns there that the job stops after the same step S: the core's
``step_done`` raises ``Stopped`` inside S's optimizer step. Leaving at that point would
drop the rest of iteration S (its callbacks, logger rows, validation, the step-interval
save) and write nothing NeMo can resume from: the core's durable checkpoints are off in a
NeMo job, NeMo's ``AutoResume`` loads the trainer's ModelCheckpoint ``-last`` checkpoint.

So the session notes S (:meth:`StopRequest.agreed`) and lets Lightning finish the
iteration. At the start of the next one, in the first callback's ``on_train_batch_start``
before any work of it, every rank has the trainer's ModelCheckpoint write its ``-last``
checkpoint of step S (``compat/nemo_checkpoint.py``; nothing new if its own interval save
just wrote step S), passes a barrier and leaves with ``EXIT_STOPPED`` (143): a new job
with the same log directory resumes there through ``AutoResume`` and continues exactly.
The save and the barrier are recovery points like any other: a failure during them is
recovered and they run again (a replacement learns of the stop from its peers' package).
A stop agreed at the job's last step simply finishes the job.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

import torch

from .. import runtime
from ..compat.nemo_checkpoint import NoResumableCheckpoint, save_last_now
from ..steps import Stopped

if TYPE_CHECKING:
    from .session import CheckpointlessSession

log = logging.getLogger(__name__)


class StopRequest:
    """The step after which every rank agreed to stop (None: no stop agreed)."""

    def __init__(self) -> None:
        self.step: Optional[int] = None

    def agreed(self, step: Optional[int]) -> None:
        if step is not None:
            self.step = step

    def due(self, completed: int) -> bool:
        """Whether Lightning, having completed step ``completed``, must stop now."""
        return self.step is not None and completed >= self.step


def checkpoint_and_leave(session: "CheckpointlessSession", step: int) -> None:
    """Every rank: the ``-last`` NeMo checkpoint of ``step``, a barrier, exit 143."""
    assert session.loop is not None
    session.loop.link.pause("stop checkpoint")  # the save takes what it takes
    trainer = session.trainer
    try:
        path, written = save_last_now(trainer)
    except NoResumableCheckpoint as err:
        path, written = None, False
        log.warning("stopping after step %d without a NeMo checkpoint: %s; a new job resumes "
                    "from the newest one written before", step, err)
    torch.distributed.barrier()  # every rank's files written, the previous -last pruned
    if session.rank == 0 and path is not None:
        log.warning("stopped after step %d as asked: NeMo checkpoint %s (%s); a new job with "
                    "the same log directory resumes from it (AutoResume)", step, path,
                    "written for the stop" if written else "written by its interval save")
    runtime.leave_on(Stopped(step), session.channel)
