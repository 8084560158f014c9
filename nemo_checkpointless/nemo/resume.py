"""``CheckpointlessResume``: NeMo's AutoResume that never reads storage for a replacement.

With checkpointless recovery a job reads a storage checkpoint only when it starts (or
restarts as a whole): a rank that replaces a failed one gets its state from its
data-parallel peers. ``AutoResume.setup`` would point such a rank at the latest disk
checkpoint (``trainer.ckpt_path``) and make it load storage while its peers hold the
state; this subclass skips that for a replacement (``NCL_REPLACEMENT=1``, set by
``ncl-launch``) and for a warm spare (``NCL_SPARE=1``: it is built before it knows which
rank it will replace), and otherwise behaves exactly like the recipe's AutoResume, whose
arguments it keeps.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from nemo.lightning.resume import AutoResume

log = logging.getLogger(__name__)


class CheckpointlessResume(AutoResume):
    """AutoResume for the job's first start; peers, not storage, for a replacement rank."""

    def setup(self, trainer: Any, model: Any = None) -> None:
        from .session import current

        session = current()
        if (session is not None and session.new) or os.environ.get("NCL_REPLACEMENT") == "1" \
                or os.environ.get("NCL_SPARE") == "1":
            log.info("replacement rank: state comes from data-parallel peers, not from "
                     "a storage checkpoint")
            return
        super().setup(trainer, model)
