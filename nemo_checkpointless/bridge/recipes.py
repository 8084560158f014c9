"""Megatron-Bridge recipes by name, offline: Bridge's own pretrain configs, and tiny_llama.

``build_recipe("llama3_70b")`` is ``megatron.bridge.recipes.llama3_70b_pretrain_config()``,
Bridge's function unchanged. Bridge's Llama recipes read the model's Hugging Face config
from the Hub (``AutoBridge.from_hf_pretrained("meta-llama/Meta-Llama-3-70B")``); the package
ships the published ``config.json`` of the models in :data:`SHIPPED` (``hf_configs/``), and
:func:`use_shipped_configs` lays them out as a Hub cache and points an offline Hub at it,
so those recipes build without network access or a Hugging Face token.

``tiny_llama`` (:func:`tiny_llama_pretrain_config`) is a Llama-3-architecture model of a few
hundred thousand parameters for CPU rehearsal, built the way Bridge's Llama recipes are
(``_pretrain_common()`` and ``AutoBridge`` over a shipped config), with the settings a CPU
without Transformer Engine needs (local layer spec, fusions off) and a short run.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import os
import re
from pathlib import Path
from typing import Any, Callable

CONFIG_DIR = Path(__file__).resolve().parent / "hf_configs"
# Hub id -> folder of hf_configs/ with its published config.json
SHIPPED = {
    "meta-llama/Meta-Llama-3-8B": "meta-llama--Meta-Llama-3-8B",
    "meta-llama/Meta-Llama-3-70B": "meta-llama--Meta-Llama-3-70B",
    "meta-llama/Meta-Llama-3.1-405B": "meta-llama--Meta-Llama-3.1-405B",
}
TINY = "tiny_llama"
# the model settings that need Transformer Engine or fused CUDA kernels
_FUSIONS = ("bias_activation_fusion", "masked_softmax_fusion", "persist_layer_norm",
            "bias_dropout_fusion", "apply_rope_fusion", "cross_entropy_loss_fusion",
            "gradient_accumulation_fusion")


def default_hub_cache() -> Path:
    return Path.home() / ".cache" / "nemo_checkpointless" / "hf-hub"


def seed_hub_cache(root: Path) -> Path:
    """Write the shipped configs under ``root`` in the Hub cache layout; returns ``root``.

    Each model gets ``models--<org>--<name>/refs/main`` naming a snapshot whose id is the
    sha1 of its config, and ``snapshots/<id>/config.json``.
    """
    root = Path(root)
    for repo_id, folder in SHIPPED.items():
        data = (CONFIG_DIR / folder / "config.json").read_bytes()
        revision = hashlib.sha1(data).hexdigest()
        model = root / ("models--" + repo_id.replace("/", "--"))
        snapshot = model / "snapshots" / revision
        snapshot.mkdir(parents=True, exist_ok=True)
        target = snapshot / "config.json"
        if not target.exists() or target.read_bytes() != data:
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            tmp.replace(target)  # atomic: ranks of one node may seed at the same time
        (model / "refs").mkdir(exist_ok=True)
        ref = model / "refs" / "main"
        if not ref.exists() or ref.read_text() != revision:
            tmp = ref.with_name(f"main.tmp{os.getpid()}")
            tmp.write_text(revision)
            tmp.replace(ref)
    return root


def use_shipped_configs(root: Path | None = None) -> Path:
    """Seed the Hub cache with the shipped configs and read the Hub from it, offline."""
    from ..compat.bridge import point_hf_hub_at

    root = seed_hub_cache(root or default_hub_cache())
    point_hf_hub_at(str(root), offline=True)
    return root


# ---------------------------------------------------------------------- recipes by name
def _family(name: str) -> str:
    match = re.match(r"[a-z]+", name)
    return match.group(0) if match else name


def recipe_function(name: str) -> Callable[[], Any]:
    """Bridge's ``<name>_pretrain_config`` (``tiny_llama``: this module's)."""
    if name == TINY:
        return tiny_llama_pretrain_config
    from ..compat.bridge import import_bridge

    import_bridge()
    attr = f"{name}_pretrain_config"
    for module_name in (f"megatron.bridge.recipes.{_family(name)}", "megatron.bridge.recipes"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, attr):
            return getattr(module, attr)
    module = importlib.import_module("megatron.bridge.recipes")
    known = sorted(n[: -len("_pretrain_config")] for n in dir(module)
                   if n.endswith("_pretrain_config"))
    close = difflib.get_close_matches(name, known + [TINY], n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise KeyError(f"recipe={name!r}: Megatron-Bridge has no {attr}() in "
                   f"megatron.bridge.recipes.{hint} (recipes: {TINY}, "
                   f"{', '.join(n for n in known if n.startswith('llama'))}, ...)")


def build_recipe(name: str) -> Any:
    """A fresh ConfigContainer of Bridge's recipe ``name`` (see the module docstring)."""
    return recipe_function(name)()


# ---------------------------------------------------------------------- tiny_llama
def cpu_model_settings(model: Any) -> None:
    """What a model provider needs on a CPU without Transformer Engine: megatron's local
    layer spec, no fused kernels, no sequence parallelism."""
    from megatron.bridge.models.gpt_provider import local_layer_spec

    model.transformer_layer_spec = local_layer_spec
    model.transformer_impl = "local"
    for name in _FUSIONS:
        setattr(model, name, False)
    model.sequence_parallel = False


def tiny_llama_pretrain_config() -> Any:
    """A CPU-sized Llama 3 recipe: 4 layers, hidden 64, GQA 4/2 heads, vocab 512, sequence
    64, global batch 8 (micro-batch 2), 8 iterations, mock data, bf16 mixed precision,
    Bridge's distributed optimizer and DDP settings (overlapped grad reduce and param
    gather), validation every 4 iterations, no checkpoint saving unless asked for."""
    from ..compat.bridge import import_bridge

    import_bridge()
    from megatron.bridge import AutoBridge
    from megatron.bridge.recipes.common import _pretrain_common

    cfg = _pretrain_common()
    cfg.model = AutoBridge.from_hf_pretrained(str(CONFIG_DIR / TINY)).to_megatron_provider(
        load_weights=False)
    cpu_model_settings(cfg.model)
    cfg.model.seq_length = 64
    cfg.model.tensor_model_parallel_size = 1
    cfg.model.pipeline_model_parallel_size = 1
    cfg.model.context_parallel_size = 1
    cfg.tokenizer.tokenizer_type = "NullTokenizer"
    cfg.tokenizer.tokenizer_model = None
    cfg.tokenizer.vocab_size = 512
    cfg.dataset.seq_length = 64
    cfg.dataset.num_workers = 0
    cfg.train.train_iters = 8
    cfg.train.global_batch_size = 8
    cfg.train.micro_batch_size = 2
    cfg.train.manual_gc = False
    cfg.validation.eval_interval = 4
    cfg.validation.eval_iters = 1
    cfg.optimizer.lr = 3e-3
    cfg.optimizer.min_lr = 3e-4
    cfg.scheduler.lr_warmup_iters = 2
    cfg.logger.log_interval = 1
    cfg.logger.tensorboard_dir = None
    cfg.logger.log_timers_to_tensorboard = False
    cfg.checkpoint.save = None
    cfg.checkpoint.load = None
    cfg.checkpoint.save_interval = 4
    cfg.dist.distributed_backend = "gloo"
    return cfg
