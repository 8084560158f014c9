"""NeMo's mock pre-training data, usable without Transformer Engine (CPU rehearsal).

Without Transformer Engine, megatron's local attention needs an explicit causal mask and
NeMo's ``gpt_forward_step`` asserts that the batch carries one. ``MockDataModule`` means
to create it (``create_attention_mask = ... or not HAVE_TE``) but NeMo 2.7.3 passes the
flag positionally into ``_MockGPTDataset``'s ``seed`` parameter
(``nemo/collections/llm/gpt/data/mock.py``, ``setup``), so the mask is never made and
training stops with "The dataloader did not provide an attention mask". This subclass
passes it by keyword; everything else is NeMo's.
"""

from __future__ import annotations

from nemo.collections.llm.gpt.data.mock import MockDataModule, _MockGPTDataset


class MaskedMockDataModule(MockDataModule):
    """``llm.MockDataModule`` whose datasets carry the causal mask when asked to."""

    def setup(self, stage: str = "") -> None:
        def make(name: str, num_samples: int) -> _MockGPTDataset:
            return _MockGPTDataset(self.tokenizer, name, num_samples, self.seq_length,
                                   create_attention_mask=self.create_attention_mask)

        self._train_ds = make("train", self.num_train_samples)
        self._validation_ds = make("valid", self.num_val_samples)
        self._test_ds = make("test", self.num_test_samples)
