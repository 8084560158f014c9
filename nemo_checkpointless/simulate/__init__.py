"""A scale model of recovery time: checkpointless vs checkpoint-restart at large sizes.

    python -m nemo_checkpointless.simulate                       # 16, 256, 2,304 GPUs
    python -m nemo_checkpointless.simulate --assume link_gbps=200 --json
    python -m nemo_checkpointless.simulate --list                # every assumption + source

From per-phase costs measured here (docs/architecture.md) and named assumptions for an
H100 cluster (:mod:`.assumptions`), with per-rank state sizes from the layout planner,
:func:`predict` sums the phases on each recovery's critical path (:mod:`.model`). See
docs/architecture.md (the scale model section) for the formulas and what they leave out.
"""

from .assumptions import ASSUMPTIONS, Assumption, AssumptionError, resolve
from .model import PUBLISHED, SIZES, Prediction, build_job, predict, predict_all

__all__ = ["ASSUMPTIONS", "Assumption", "AssumptionError", "PUBLISHED", "Prediction", "SIZES",
           "build_job", "predict", "predict_all", "resolve"]
