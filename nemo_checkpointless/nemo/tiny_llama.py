"""``tiny_llama``: a NeMo 2 pre-training recipe small enough for CPU rehearsal.

Built like NeMo's own ``llm.<model>.pretrain_recipe()`` (a ``run.Partial`` of
``llm.pretrain`` with model, trainer + MegatronStrategy, data, log, optim, resume) so the
same ``apply_checkpointless`` and overrides apply, and set up like NeMo's real recipes at
small intervals: a ``NeMoLogger`` with TensorBoard, a ``ModelCheckpoint`` every 4 steps
(NeMo's distributed checkpoint with optimizer state), validation every 4 steps on 2
batches, NeMo's ``AutoResume`` resuming from the latest checkpoint of the log directory.
Llama-3 architecture (RMSNorm, SwiGLU, RoPE, GQA), 2 layers, hidden 64, fp32, NeMo's mock
data with a byte-level tokenizer (nothing is downloaded), the fusions that need CUDA
kernels turned off.
"""

from __future__ import annotations

import nemo_run as run
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig
from nemo import lightning as nl
from nemo.collections.common.tokenizers.bytelevel_tokenizers import ByteLevelTokenizer
from nemo.collections.llm.api import pretrain
from nemo.collections.llm.gpt.model.llama import Llama3Config, LlamaModel
from nemo.lightning.pytorch.optim import CosineAnnealingScheduler, MegatronOptimizerModule

from .data import MaskedMockDataModule

NAME = "tiny_llama"
SEQ_LENGTH = 32
INTERVAL = 4  # validation and checkpoint every INTERVAL steps


def model() -> run.Config:
    config = run.Config(
        Llama3Config, num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        num_query_groups=2, seq_length=SEQ_LENGTH, bf16=False, fp16=False,
        params_dtype=torch.float32, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, use_cpu_initialization=True)
    return run.Config(LlamaModel, config=config)


def trainer(num_nodes: int = 1, devices: int = 2, max_steps: int = 8) -> run.Config:
    strategy = run.Config(
        nl.MegatronStrategy, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        context_parallel_size=1, sequence_parallel=False, ckpt_async_save=False,
        ddp=run.Config(DistributedDataParallelConfig, use_distributed_optimizer=True,
                       grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                       overlap_param_gather=False, check_for_nan_in_grad=True))
    return run.Config(
        nl.Trainer, accelerator="cpu", devices=devices, num_nodes=num_nodes,
        max_steps=max_steps, strategy=strategy, log_every_n_steps=1,
        val_check_interval=INTERVAL, limit_val_batches=2, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, use_distributed_sampler=False, enable_progress_bar=False,
        plugins=run.Config(nl.MegatronMixedPrecision, precision="32"))


def log(dir: str | None = None, name: str = NAME) -> run.Config:
    """NeMo's ``default_log`` at small intervals: TensorBoard, checkpoints every 4 steps."""
    ckpt = run.Config(
        nl.ModelCheckpoint, every_n_train_steps=INTERVAL, save_last=True, save_top_k=-1,
        monitor="reduced_train_loss", save_optim_on_train_end=True, always_save_context=False,
        save_context_on_train_end=False,
        filename="{model_name}--{step}-{consumed_samples}")
    return run.Config(nl.NeMoLogger, name=name, log_dir=dir, ckpt=ckpt, wandb=None,
                      tensorboard=run.Config(TensorBoardLogger, save_dir="tb_logs", name=name))


def pretrain_recipe(num_nodes: int = 1, num_gpus_per_node: int = 2, max_steps: int = 8,
                    dir: str | None = None, name: str = NAME) -> run.Partial:
    """The recipe; ``num_gpus_per_node`` keeps NeMo's argument name (CPU ranks here)."""
    optim = run.Config(
        MegatronOptimizerModule,
        config=run.Config(OptimizerConfig, optimizer="adam", lr=3e-3, weight_decay=0.01,
                          adam_beta1=0.9, adam_beta2=0.95, bf16=False, fp16=False,
                          params_dtype=torch.float32, use_distributed_optimizer=True,
                          clip_grad=1.0),
        lr_scheduler=run.Config(CosineAnnealingScheduler, warmup_steps=2, min_lr=3e-4))
    return run.Partial(
        pretrain,
        model=model(),
        trainer=trainer(num_nodes, num_gpus_per_node, max_steps),
        data=run.Config(MaskedMockDataModule, seq_length=SEQ_LENGTH, global_batch_size=8,
                        micro_batch_size=2, num_train_samples=10_000, num_val_samples=1_000,
                        num_workers=0, tokenizer=run.Config(ByteLevelTokenizer)),
        log=log(dir, name),
        optim=optim,
        resume=run.Config(nl.AutoResume, resume_if_exists=True,
                          resume_ignore_no_checkpoint=True),
    )
