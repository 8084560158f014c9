"""NeMo's mock pre-training data, usable without Transformer Engine and resumable.

:class:`MaskedMockDataModule` is NeMo's ``MockDataModule`` with three fixes, each making
it behave like NeMo's real ``PreTrainingDataModule``:

* the causal mask: without Transformer Engine, megatron's local attention needs an
  explicit mask and NeMo's ``gpt_forward_step`` asserts the batch carries one.
  ``MockDataModule`` means to create it but NeMo 2.7.3 passes the flag positionally into
  ``_MockGPTDataset``'s ``seed`` (``nemo/collections/llm/gpt/data/mock.py``, ``setup``);
  here it goes by keyword;
* data loaders know their mode (NeMo's ``WrappedDataLoader``): the validation sampler
  starts at sample 0 at every validation, not at the training position;
* the data position is part of the module's state (``consumed_samples``), so a NeMo
  checkpoint resumes at the next sample, and NeMo logs consumed samples from the step the
  loader was made at (``init_global_step``).
"""

from __future__ import annotations

from typing import Any

from nemo.collections.llm.gpt.data.mock import MockDataModule, _MockGPTDataset
from nemo.lightning.data import WrappedDataLoader


class MaskedMockDataModule(MockDataModule):
    """``llm.MockDataModule`` with the mask, loader modes and a resumable position."""

    def setup(self, stage: str = "") -> None:
        def make(name: str, num_samples: int) -> _MockGPTDataset:
            return _MockGPTDataset(self.tokenizer, name, num_samples, self.seq_length,
                                   create_attention_mask=self.create_attention_mask)

        self._train_ds = make("train", self.num_train_samples)
        self._validation_ds = make("valid", self.num_val_samples)
        self._test_ds = make("test", self.num_test_samples)

    def train_dataloader(self) -> Any:
        if not hasattr(self, "_train_ds"):
            self.setup()
        return self._loader(self._train_ds, "train")

    def val_dataloader(self) -> Any:
        if not hasattr(self, "_validation_ds"):
            self.setup()
        return self._loader(self._validation_ds, "validation")

    def test_dataloader(self) -> Any:
        if not hasattr(self, "_test_ds"):
            self.setup()
        return self._loader(self._test_ds, "test")

    def _loader(self, dataset: Any, mode: str) -> WrappedDataLoader:
        self.init_global_step = self.trainer.global_step
        self.data_sampler.init_global_step = self.init_global_step
        return WrappedDataLoader(mode=mode, dataset=dataset, num_workers=self.num_workers,
                                 pin_memory=self.pin_memory,
                                 persistent_workers=self.persistent_workers,
                                 collate_fn=dataset.collate_fn)

    def state_dict(self) -> dict[str, Any]:
        step = self.trainer.global_step - getattr(self, "init_global_step", 0)
        return {"consumed_samples": self.data_sampler.compute_consumed_samples(step)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from megatron.core.num_microbatches_calculator import update_num_microbatches

        consumed = state_dict["consumed_samples"]
        self.data_sampler.init_consumed_samples = consumed
        self.data_sampler.prev_consumed_samples = consumed
        update_num_microbatches(consumed_samples=consumed, consistency_check=False)
        self.data_sampler.if_first_step = 1
