"""Build megatron-core GPTModel chunks from a :class:`ModelConfig` and a parallel layout.

The chunks are built on the rank's device (``device.current()``): on a GPU rank
megatron's own GPU initialisation (weights drawn on ``torch.cuda.current_device()`` with
its tensor-parallel RNG tracker, RoPE's ``inv_freq`` created there) and Transformer
Engine's layer spec when TE is importable (fused attention, context parallelism, fp8 need
it); in CPU rehearsal the local spec with CPU initialisation, as before. Batches reach
the device in the loop (``train/loop.py`` ``to_device``).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Optional

import torch

from .. import device as rank_device
from ..config import ModelConfig, StrategyConfig, padded_vocab_size

LAYER_SPECS = ("auto", "transformer_engine", "local")

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
        # CPU rehearsal (and meta sizing) initialise on the host; a GPU rank initialises
        # on its device, megatron's GPU path
        use_cpu_initialization=meta or not rank_device.is_cuda(),
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
    layer_impl: str = "auto",
) -> list[torch.nn.Module]:
    """One GPTModel per virtual pipeline stage held by this rank (one without VP).

    ``parallel_state`` must be initialised. With ``meta=True`` the parameters live on the
    meta device (for sizing 70B/405B configs without memory); ``draw_weights=False``
    zero-fills them (see :func:`transformer_config`). Otherwise they live on the rank's
    device. ``layer_impl``: see :func:`layer_spec`.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel

    config = transformer_config(model, strategy, meta=meta, draw_weights=draw_weights)
    spec = layer_spec(model, layer_impl)
    vocab = padded_vocab_size(model, strategy.tensor_model_parallel_size)
    vp = strategy.virtual_pipeline_model_parallel_size
    stages: list[Optional[int]] = list(range(vp)) if vp else [None]
    chunks: list[torch.nn.Module] = []
    for vp_stage in stages:
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        device = torch.device("meta") if meta else rank_device.current()
        with device:  # tensors megatron creates without a device land on the rank's
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


def te_available() -> bool:
    """Whether Transformer Engine's PyTorch modules import here (installed and loadable:
    a TE built for another CUDA fails at import, and then counts as absent)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def layer_spec(model: ModelConfig, impl: str = "auto") -> Any:
    """The transformer layer spec: ``transformer_engine`` (TE modules: what the real
    recipes need on GPUs), ``local`` (megatron's own modules: CPU rehearsal), or ``auto``:
    TE on a GPU rank where TE is importable, local otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if impl not in LAYER_SPECS:
        raise ValueError(f"layer spec {impl!r}: choose one of {', '.join(LAYER_SPECS)}")
    if impl == "auto":
        impl = "transformer_engine" if rank_device.is_cuda() and te_available() else "local"
    if impl == "transformer_engine":
        if not te_available():
            raise RuntimeError("layer spec transformer_engine: Transformer Engine is not "
                               "importable (pip install transformer_engine[pytorch]); use "
                               "the local spec instead")
        return specs.get_gpt_layer_with_transformer_engine_spec()
    return specs.get_gpt_layer_local_spec(normalization=model.normalization)


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
