"""The lean loop as a front-end of the recovery core: builds a :class:`Trainer` per rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import RunConfig
from ..steps import HookList
from .loop import Trainer


class LeanFrontEnd:
    """Builds the lean loop's :class:`Trainer` (and a warm spare's model ahead of time)."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)

    def build(self, hooks: HookList, *, collective: bool,
              prebuilt: Optional[Callable[[], Optional[list[torch.nn.Module]]]]) -> Trainer:
        trainer = Trainer(self.cfg, self.run_dir, hooks)
        trainer.setup(collective=collective, prebuilt=prebuilt)
        return trainer

    def spare_model(self) -> Optional[list[Any]]:
        """Model chunks and DDP, zero-filled, where every rank has the same model."""
        from ..megatron import optimizer as mopt
        from ..megatron import parallel
        from ..megatron.model import build_model_chunks

        cfg = self.cfg
        if not parallel.model_is_rank_independent(cfg.strategy):
            return None
        torch.set_num_threads(cfg.trainer.num_threads)
        parallel.initialize(cfg.strategy, gloo_groups=False)
        chunks = build_model_chunks(cfg.model, cfg.strategy, cfg.data.seq_length,
                                    draw_weights=False)
        return mopt.wrap_ddp(chunks, cfg.strategy)
