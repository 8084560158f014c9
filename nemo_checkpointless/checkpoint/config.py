"""``checkpoint.*``: when durable checkpoints are written, where, and whether a job resumes.

:class:`CheckpointConfig` is meant to sit in ``RunConfig`` as ``checkpoint``; the helpers
turn it into a :class:`~.checkpointer.DurableCheckpointer` and a resume decision.

Default interval. Under ``ncl-launch`` durable checkpoints are on every
:data:`DEFAULT_INTERVAL_STEPS` steps unless ``checkpoint.interval`` says otherwise (``0``
turns them off); under plain ``torchrun`` they are off unless asked for. The number
comes from what a save costs the step. The training thread blocks for the save
agreement, megatron's state dicts and planning, and the host copy: tiny_gpt on 4 gloo
ranks (20 MB per rank) measured 80-120 ms per save once megatron's plans are cached
(0.25-0.76 s for the first two saves, which plan collectively), on 2 cores shared with a
load average of 25-50, against a step of ~0.3 s on a quiet machine; on a GPU add a
device-to-pinned copy of the rank's share (~0.3-0.5 s for a 70B rank at ~25 GB/s) to a
step of ~5 s. At 100 steps the blocking part is 0.3-0.4% of the step time in the first
case and about 0.1% in the second (the target is 2%; the bench measures the whole cost,
background write included), the background write of a rank's part has 100 steps to
finish before the next save waits for it, and a job that dies entirely loses at most 100
steps. Pick ``interval_minutes`` instead (or as well) to bound the lost time directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

RESUME_MODES = ("auto", "never")
DEFAULT_INTERVAL_STEPS = 100
DIR_NAME = "checkpoints"


@dataclass(kw_only=True)
class CheckpointConfig:
    """Durable checkpoints in megatron-core's ``dist_checkpointing`` format (torch_dist).

    ``interval``: steps between saves; None: :data:`DEFAULT_INTERVAL_STEPS` under
    ncl-launch, off otherwise; 0: off. ``interval_minutes``: also save when this much
    time has passed since the last save. ``dir``: None: ``<hydra run dir>/checkpoints``.
    ``resume``: ``auto`` loads the newest complete, verified checkpoint at start; ``never``
    starts at step 0. ``keep``: complete checkpoints kept. ``verify``: check every file's
    SHA-256 before loading (otherwise only the manifest). ``finalize_timeout_s``: how long
    rank 0 waits for every rank's files before leaving a checkpoint incomplete.
    """

    interval: Optional[int] = None
    interval_minutes: Optional[float] = None
    dir: Optional[str] = None
    resume: str = "auto"
    keep: int = 2
    verify: bool = True
    finalize_timeout_s: float = 600.0


def validate(cfg: CheckpointConfig) -> None:
    """Raise ValueError naming the key and the fix."""
    if cfg.interval is not None and cfg.interval < 0:
        raise ValueError(f"checkpoint.interval={cfg.interval}: a number of steps (0 turns "
                         "durable checkpoints off; leave unset for the default)")
    if cfg.interval_minutes is not None and cfg.interval_minutes <= 0:
        raise ValueError(f"checkpoint.interval_minutes={cfg.interval_minutes}: a positive "
                         "number of minutes, or null")
    if cfg.resume not in RESUME_MODES:
        raise ValueError(f"checkpoint.resume={cfg.resume!r}: use one of "
                         f"{', '.join(RESUME_MODES)}")
    if cfg.keep < 1:
        raise ValueError(f"checkpoint.keep={cfg.keep}: keep at least 1 checkpoint (2 or "
                         "more lets a damaged newest one fall back to the previous)")
    if cfg.finalize_timeout_s <= 0:
        raise ValueError(f"checkpoint.finalize_timeout_s={cfg.finalize_timeout_s}: positive")


def interval_steps(cfg: CheckpointConfig, under_agent: bool) -> Optional[int]:
    """Steps between saves, or None for no step schedule."""
    if cfg.interval is None:
        return DEFAULT_INTERVAL_STEPS if under_agent else None
    return cfg.interval or None


def enabled(cfg: CheckpointConfig, under_agent: bool) -> bool:
    return interval_steps(cfg, under_agent) is not None or cfg.interval_minutes is not None


def directory(cfg: CheckpointConfig, run_dir: Path | str) -> Path:
    return Path(cfg.dir) if cfg.dir else Path(run_dir) / DIR_NAME


def make_checkpointer(cfg: CheckpointConfig, run_dir: Path | str, under_agent: bool):
    """The rank's :class:`~.checkpointer.DurableCheckpointer`, or None when off."""
    from .checkpointer import DurableCheckpointer

    validate(cfg)
    if not enabled(cfg, under_agent):
        return None
    return DurableCheckpointer(directory(cfg, run_dir),
                               interval_steps=interval_steps(cfg, under_agent),
                               interval_minutes=cfg.interval_minutes, keep=cfg.keep,
                               finalize_timeout_s=cfg.finalize_timeout_s)
