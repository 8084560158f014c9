"""The job's progress line and its non-finite-loss check, the same under every launcher.

Whoever runs the step loop (the lean loop under torchrun, the recovery loop under
ncl-launch, a NeMo or Bridge driver) passes each committed step's metrics to
:meth:`Progress.on_step`: every ``interval`` steps rank 0 logs step, loss, step time,
tokens per second and the time left; on every rank a non-finite loss stops the job with
:class:`NonFiniteLoss` (the loss is all-reduced, so every rank reaches the same verdict).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from typing import Any

log = logging.getLogger("ncl.progress")


class NonFiniteLoss(FloatingPointError):
    """The loss of a committed step is NaN or infinite: training cannot go on from it."""


def _duration(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Progress:
    """Progress line at an interval (rank 0) and the non-finite check (every rank)."""

    def __init__(self, *, max_steps: int, tokens_per_step: int, interval: int = 1,
                 enabled: bool = True, window: int = 20) -> None:
        self.max_steps = max_steps
        self.tokens_per_step = tokens_per_step
        self.interval = max(1, interval)
        self.enabled = enabled
        self._times: deque[float] = deque(maxlen=window)

    def on_step(self, metrics: Any) -> None:
        """``metrics`` has ``step``, ``loss`` and ``step_time_s`` (StepMetrics)."""
        step, loss, seconds = int(metrics.step), float(metrics.loss), float(metrics.step_time_s)
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss} at step {step}: stopping (lower optim.lr, "
                                "check the data, or enable gradient clipping)")
        self._times.append(seconds)
        if not self.enabled or step % self.interval:
            return
        typical = statistics.median(self._times)
        rate = self.tokens_per_step / typical if typical > 0 else float("nan")
        log.info("step %d/%d loss %.6f step %.3fs %.0f tokens/s left %s", step,
                 self.max_steps, loss, seconds, rate,
                 _duration((self.max_steps - step) * typical))
