"""Build megatron-core GPTModel chunks from a :class:`ModelConfig` and a parallel layout."""

from __future__ import annotations

from typing import Optional

import torch

from ..config import ModelConfig, StrategyConfig, padded_vocab_size

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def transformer_config(model: ModelConfig, strategy: StrategyConfig, *, meta: bool = False,
                       draw_weights: bool = True):
    """The megatron ``TransformerConfig`` for ``model`` under ``strategy``.

    ``draw_weights=False``: weights are zero-filled instead of drawn (a replacement rank,
    whose weights all come from its peers). megatron's initialization still runs, so the
    tensor-parallel attributes it sets are there (the grad-norm reduction reads them).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = _DTYPES[model.params_dtype]
    swiglu = model.activation == "swiglu"
    inits = {}
    if not draw_weights:
        zeros = torch.nn.init.zeros_
        inits = dict(init_method=zeros, output_layer_init_method=zeros,
                     embedding_init_method=zeros)
    return TransformerConfig(
        **inits,
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=swiglu,
        activation_func=torch.nn.functional.silu if swiglu else torch.nn.functional.gelu,
        add_bias_linear=model.add_bias_linear,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=strategy.tensor_model_parallel_size,
        pipeline_model_parallel_size=strategy.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=strategy.virtual_pipeline_model_parallel_size,
        context_parallel_size=strategy.context_parallel_size,
        sequence_parallel=strategy.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,
        perform_initialization=not meta,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        deallocate_pipeline_outputs=False,
    )


def build_model_chunks(
    model: ModelConfig,
    strategy: StrategyConfig,
    seq_length: int,
    *,
    meta: bool = False,
    draw_weights: bool = True,
) -> list[torch.nn.Module]:
    """One GPTModel per virtual pipeline stage held by this rank (one without VP).

    ``parallel_state`` must be initialised. With ``meta=True`` the parameters live on the
    meta device (for sizing 70B/405B configs without memory); ``draw_weights=False``
    zero-fills them (see :func:`transformer_config`).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    config = transformer_config(model, strategy, meta=meta, draw_weights=draw_weights)
    spec = get_gpt_layer_local_spec(normalization=model.normalization)
    vocab = padded_vocab_size(model, strategy.tensor_model_parallel_size)
    vp = strategy.virtual_pipeline_model_parallel_size
    stages: list[Optional[int]] = list(range(vp)) if vp else [None]
    chunks: list[torch.nn.Module] = []
    for vp_stage in stages:
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        device = torch.device("meta") if meta else torch.device("cpu")
        with device:
            chunk = GPTModel(
                config=config,
                transformer_layer_spec=spec,
                vocab_size=vocab,
                max_sequence_length=max(seq_length, model.max_position_embeddings),
                pre_process=pre,
                post_process=post,
                share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
                position_embedding_type=model.position_embedding_type,
                rotary_base=model.rotary_base,
                vp_stage=vp_stage,
            )
        chunks.append(chunk)
    return chunks


def count_parameters(chunks: list[torch.nn.Module]) -> int:
    """Number of parameters held by this rank's chunks (shared weights counted once)."""
    seen: set[int] = set()
    total = 0
    for chunk in chunks:
        for p in chunk.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total
