"""The data a rank needs for one step: its micro-batches, a pure function of consumed_samples."""

from __future__ import annotations

from typing import Any

import torch

from ..config import DataConfig, RunConfig, data_cache_dir
from ..megatron.parallel import Coordinates


class StepData:
    """Megatron's GPTDataset over an indexed dataset, positioned by ``consumed_samples``.

    The sample order depends only on ``data.seed``-derived shuffles and ``data.num_samples``
    (not on how many steps a run takes), so a run of 20 steps and one of 40 see the same
    first 20 global batches.
    """

    def __init__(self, cfg: DataConfig, seed: int, coords: Coordinates) -> None:
        from ..data import build_gpt_dataset, ensure_indexed_dataset, load_tokenizer

        self.cfg = cfg
        self.coords = coords
        tokenizer = load_tokenizer()
        cache_dir = data_cache_dir(cfg)
        prefix = cfg.path or ensure_indexed_dataset(cache_dir, tokenizer=tokenizer)
        self.dataset = build_gpt_dataset(
            prefix=prefix,
            seq_length=cfg.seq_length,
            num_samples=cfg.num_samples,
            seed=seed,
            cache_dir=cache_dir,
            tokenizer=tokenizer,
        )

    def micro_batches(self, consumed_samples: int) -> list[dict[str, torch.Tensor]]:
        """This DP rank's micro-batches of the global batch starting at ``consumed_samples``."""
        from ..data import collate, micro_batch_indices

        if consumed_samples + self.cfg.global_batch_size > len(self.dataset):
            raise IndexError(
                f"the dataset holds {len(self.dataset)} samples, but step needs up to "
                f"{consumed_samples + self.cfg.global_batch_size}; raise data.num_samples"
            )
        indices = micro_batch_indices(
            consumed_samples,
            self.cfg.global_batch_size,
            self.cfg.micro_batch_size,
            self.coords.dp_rank,
            self.coords.dp_size,
        )
        return [collate([self._sample(i) for i in mb]) for mb in indices]

    def _sample(self, index: int) -> dict[str, Any]:
        return self.dataset[index]


def make_step_data(cfg: RunConfig, coords: Coordinates) -> StepData:
    """The data source the loop uses: direct loading (tier 2 adds the shared-memory cache)."""
    return StepData(cfg.data, cfg.trainer.seed, coords)
