"""What the optimizer-state replicas cost in GPU memory, per rank and pipeline stage.

Parameters per rank are counted analytically from the model config for megatron's local
GPT layer spec (the one :func:`nemo_checkpointless.megatron.model.build_model_chunks`
uses), stage by stage: the first stage holds the word (and learned position) embedding,
the last the final norm and the output layer; TP shards the linear layers and the
vocabulary (padded to a multiple of ``make_vocab_size_divisible_by * TP``); norms and
row-parallel biases are replicated. Every TP rank of a stage holds the same count.
``tests/dist/test_plan_groups.py`` checks these counts against the model built on the meta
device under TP=2 and PP=2, and ``tests/unit/test_plan.py`` against the published totals.

Optimizer state per parameter (megatron's mixed-precision Adam): bf16 params keep an fp32
main copy, ``exp_avg`` and ``exp_avg_sq``: 12 bytes; fp32 params are their own main
params (the distributed optimizer's shard is a view of them): 8 bytes. The distributed
optimizer splits that state over the ``dp*cp/k`` ranks of an instance, so ``k`` instances
cost ``k`` times the state of one. Buffer padding (a few KiB per bucket) is ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ModelConfig, padded_vocab_size
from .layout import Layout

OPTIMIZER_BYTES_PER_PARAM = {"bfloat16": 12, "float32": 8}
GiB = 1024 ** 3


def layer_parameters(model: ModelConfig, tp: int) -> int:
    """Parameters of one transformer layer held by one TP rank."""
    h = model.hidden_size
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    kv = model.kv_channels or h // heads
    ffn = model.ffn_hidden_size or 4 * h
    gated = 2 if model.activation == "swiglu" else 1
    norm = 2 * h if model.normalization == "LayerNorm" else h
    qkv_out = kv * (heads + 2 * groups)
    sharded = h * qkv_out + heads * kv * h + h * ffn * gated + ffn * h
    replicated = 2 * norm
    if model.add_bias_linear:
        sharded += qkv_out + ffn * gated      # column-parallel biases
        replicated += 2 * h                   # row-parallel (proj, fc2) biases
    return sharded // tp + replicated


def stage_parameters(model: ModelConfig, tp: int, pp: int, seq_length: int) -> list[int]:
    """Parameters held by one rank of each pipeline stage (index = pp rank)."""
    h = model.hidden_size
    vocab = padded_vocab_size(model, tp)
    norm = 2 * h if model.normalization == "LayerNorm" else h
    per_layer = layer_parameters(model, tp)
    out = []
    for stage in range(pp):
        first, last = stage == 0, stage == pp - 1
        n = per_layer * (model.num_layers // pp)
        if first:
            n += vocab * h // tp
            if model.position_embedding_type == "learned_absolute":
                n += max(seq_length, model.max_position_embeddings) * h
        if last:
            n += norm
            # with tied embeddings the output layer reuses the embedding on a single stage;
            # with PP>1 the last stage keeps its own copy (synced by megatron)
            if not (model.share_embeddings_and_output_weights and first):
                n += vocab * h // tp
        out.append(n)
    return out


def total_parameters(model: ModelConfig, seq_length: int) -> int:
    """Unsharded parameter count (TP=1, PP=1): compare with ``published_num_params``."""
    return stage_parameters(model, 1, 1, seq_length)[0]


@dataclass(frozen=True)
class MemoryEstimate:
    """Optimizer state per rank for each pipeline stage, this layout vs one instance."""

    stage_params: tuple[int, ...]   # parameters per rank, by pp stage
    bytes_per_param: int
    ways: int                       # ranks sharing one copy of the state (dp*cp/k; 1: plain)
    baseline_ways: int              # dp*cp: the distributed optimizer with one instance

    def state_bytes(self, stage: int) -> int:
        return math.ceil(self.stage_params[stage] / self.ways) * self.bytes_per_param

    def baseline_bytes(self, stage: int) -> int:
        return math.ceil(self.stage_params[stage] / self.baseline_ways) * self.bytes_per_param

    def extra_bytes(self, stage: int) -> int:
        return self.state_bytes(stage) - self.baseline_bytes(stage)

    @property
    def max_extra_bytes(self) -> int:
        return max(self.extra_bytes(s) for s in range(len(self.stage_params)))

    @property
    def max_state_bytes(self) -> int:
        return max(self.state_bytes(s) for s in range(len(self.stage_params)))


def estimate(model: ModelConfig, layout: Layout, seq_length: int,
             instances: int | None = None) -> MemoryEstimate:
    """Memory estimate for ``layout`` (or for it with ``instances`` instead of its own k)."""
    k = layout.instances if instances is None else instances
    if layout.distributed_optimizer or instances is not None:
        ways = layout.dp_cp // k
    else:
        ways = 1
    return MemoryEstimate(
        stage_params=tuple(stage_parameters(model, layout.tp, layout.pp, seq_length)),
        bytes_per_param=OPTIMIZER_BYTES_PER_PARAM[model.params_dtype],
        ways=ways, baseline_ways=layout.dp_cp)
