"""Load a durable checkpoint with stock megatron-core only (launched by torchrun).

    durable_stock_loader.py CHECKPOINT_DIR REFERENCE_DIR TP

Imports torch and megatron-core and nothing of nemo_checkpointless except, without a
GPU, its CPU rehearsal shim (``nemo_checkpointless.cpu``: megatron's DDP and
DistributedOptimizer assume CUDA; the shim has nothing to do with checkpoints). It builds
the tiny_gpt model, DDP and DistributedOptimizer with megatron's own constructors, reads
the sharding options the checkpoint records (``load_content_metadata``, as Megatron-LM
does), loads with ``dist_checkpointing.load`` and compares every tensor with the values
the training job dumped when it saved (``REFERENCE_DIR/rank_R.pt``). Each rank prints
``STOCK_LOAD {json}``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist


def flat_tensors(sharded: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every ShardedTensor(Factory) of a sharded state dict as {"key@offset": tensor},
    skipping the optimizer buckets' padding pieces (their bytes are never read)."""
    from megatron.core.dist_checkpointing.mapping import (LocalNonpersistentObject,
                                                          ShardedTensor, ShardedTensorFactory)

    out: dict[str, torch.Tensor] = {}
    if isinstance(sharded, dict):
        pad = sharded.get("padding")
        if isinstance(pad, LocalNonpersistentObject) and pad.unwrap():
            return out
        for k, v in sharded.items():
            out.update(flat_tensors(v, f"{prefix}{k}."))
    elif isinstance(sharded, (list, tuple)):
        for i, v in enumerate(sharded):
            out.update(flat_tensors(v, f"{prefix}{i}."))
    elif isinstance(sharded, (ShardedTensor, ShardedTensorFactory)):
        offset = getattr(sharded, "global_offset", None)
        out[f"{sharded.key}@{offset}"] = sharded.data.detach().clone()
    return out


def build(tp: int):
    """tiny_gpt (conf/recipe/tiny_gpt.yaml) with megatron-core's own classes."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.transformer_config import TransformerConfig

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(
        num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=8,
        num_query_groups=4, normalization="RMSNorm", layernorm_epsilon=1e-5,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, params_dtype=torch.float32, use_cpu_initialization=True,
        masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(
        normalization="RMSNorm"), vocab_size=4096, max_sequence_length=1024,
        position_embedding_type="rope", rotary_base=10000,
        share_embeddings_and_output_weights=False)
    ddp = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), module=model)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=3e-3, min_lr=3e-4, weight_decay=0.01, adam_beta1=0.9,
        adam_beta2=0.95, clip_grad=1.0, use_distributed_optimizer=True,
        params_dtype=torch.float32), [ddp])
    # torch's Adam creates its state at the first step; megatron's load needs it (as
    # Megatron-Bridge does before a resume): one step with zero gradients and lr 0
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()  # DDP's gradient buffers start at zero
    return model, optimizer


def main() -> None:
    if not torch.cuda.is_available():
        from nemo_checkpointless import cpu  # CUDA -> CPU shim only

        cpu.enable()
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import load_content_metadata

    ckpt, reference, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ours = sorted(m for m in sys.modules if m.startswith("nemo_checkpointless")
                  and m not in ("nemo_checkpointless", "nemo_checkpointless.cpu"))
    model, optimizer = build(tp)
    metadata = dict(load_content_metadata(ckpt) or {})
    metadata["dp_cp_group"] = ps.get_data_parallel_group(with_context_parallel=True)

    def sharded(is_loading: bool) -> dict[str, Any]:
        sd = {"model": model.sharded_state_dict(metadata=metadata)}
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading,
                                                       metadata=metadata)
        return sd

    loaded = dist_checkpointing.load(sharded(True), ckpt)
    with torch.no_grad():
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
    got = flat_tensors(sharded(False))
    want = torch.load(os.path.join(reference, f"rank_{rank}.pt"))
    mismatched = sorted(k for k in want if k not in got or not torch.equal(got[k], want[k]))
    groups = loaded["optimizer"]["optimizer"]["param_groups"]
    print("STOCK_LOAD " + json.dumps({
        "rank": rank, "tensors": len(want), "mismatched": mismatched[:5],
        "missing": sorted(set(want) - set(got))[:5], "our_modules": ours,
        "iteration": loaded.get("iteration"), "optimizer_step": groups[0].get("step"),
        "sharding": metadata.get("distrib_optim_sharding_type")}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
