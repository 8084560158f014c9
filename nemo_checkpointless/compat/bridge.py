"""Every Megatron-Bridge internal the package touches: start-up on a CPU wheel install, and
the seams of Bridge's loop that the step driver (``bridge/driver.py``) uses.

Start-up: three assumptions that a wheel install on CPU breaks, each met here and nowhere
else (found by feature detection, applied once):

* ``megatron/bridge/peft/lora_layers.py`` imports Transformer Engine unguarded, and
  ``import megatron.bridge`` reaches it. Without TE that module alone is given a stand-in
  ``transformer_engine.pytorch`` while it executes (every name a placeholder that raises
  when used: LoRA on TE layers needs TE); the stand-in leaves ``sys.modules`` right after,
  so every guarded ``try: import transformer_engine`` elsewhere still sees no TE.
* ``training/initialize.py`` calls ``compile_helpers()``, which runs ``make`` in the
  installed ``megatron/core/datasets`` (a wheel ships the built extension, no Makefile,
  and the failure exits the process): skipped when the built extension imports.
* ``training/setup.py`` calls ``initialize_megatron`` without ``allow_no_cuda``, which
  asserts CUDA: in CPU rehearsal mode (``nemo_checkpointless/cpu.py``) it is passed.

The loop's seams: the module-level ``train_step`` and ``save_checkpoint_and_time`` that
``train()`` looks up at each call, the optimizer Bridge's set-up builds, the arguments of
its parallel-state initialisation, and the loop state a fresh ``train()`` assumes.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import logging
import sys
import threading
import types
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

_LORA = "megatron.bridge.peft.lora_layers"
_TE = ("transformer_engine", "transformer_engine.pytorch")
_LOCK = threading.Lock()
_DONE: set[str] = set()
_SAVE_HOOK: list[Callable[[], None]] = []


class _Placeholder(type):
    """A Transformer Engine name that exists for annotations and ``isinstance`` only."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise ImportError(f"transformer_engine.{cls.__name__} was called, but Transformer "
                          "Engine is not installed (LoRA on TE layers needs it)")


class _LoraLoader(importlib.abc.Loader):
    def __init__(self, real: importlib.abc.Loader) -> None:
        self.real = real

    def create_module(self, spec: Any) -> Any:
        return self.real.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        # its other imports first, without the stand-in: they may probe for TE themselves
        for name in ("megatron.core.transformer.moe.moe_utils",
                     "megatron.bridge.peft.adapter_wrapper", "megatron.bridge.peft.lora_merge"):
            importlib.import_module(name)
        te = types.ModuleType(_TE[0])
        te_torch = types.ModuleType(_TE[1])
        te_torch.__getattr__ = lambda name: _Placeholder(name, (), {})  # type: ignore[method-assign]
        te.pytorch = te_torch  # type: ignore[attr-defined]
        sys.modules.update({_TE[0]: te, _TE[1]: te_torch})
        try:
            self.real.exec_module(module)  # type: ignore[attr-defined]
        finally:
            for name in _TE:
                sys.modules.pop(name, None)


class _LoraFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _LORA:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoraLoader(spec.loader)
        return spec


def _has_transformer_engine() -> bool:
    return importlib.util.find_spec(_TE[0]) is not None


def _once(key: str) -> bool:
    with _LOCK:
        if key in _DONE:
            return False
        _DONE.add(key)
        return True


def import_bridge() -> types.ModuleType:
    """``import megatron.bridge`` with or without Transformer Engine installed."""
    if _once("lora") and not _has_transformer_engine() and _LORA not in sys.modules:
        sys.meta_path.insert(0, _LoraFinder())
    try:
        return importlib.import_module("megatron.bridge")
    except ImportError as err:
        raise ImportError(
            f"Megatron-Bridge does not import here ({err}); install the pinned stack with "
            "`make venv-latest` (requirements/latest.txt)") from err


def prepare_start_up(cpu_mode: bool) -> None:
    """Patch Bridge's start-up for a wheel install (and for CPU rehearsal when ``cpu_mode``)."""
    import_bridge()
    if _once("helpers"):
        _skip_helper_compilation()
    if cpu_mode and _once("no_cuda"):
        from megatron.bridge.training import setup as bridge_setup

        bridge_setup.initialize_megatron = functools.partial(bridge_setup.initialize_megatron,
                                                             allow_no_cuda=True)


def _skip_helper_compilation() -> None:
    from megatron.bridge.training import initialize

    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
    except ImportError:
        log.warning("megatron-core's dataset helpers are not built: Bridge will try to "
                    "compile them with make")
        return
    initialize.compile_helpers = lambda: None


def point_hf_hub_at(cache_dir: str, offline: bool = True) -> None:
    """Make Hugging Face Hub lookups read ``cache_dir`` (and nothing online when ``offline``).

    Set through the environment (read when ``huggingface_hub`` is imported) and, when it is
    imported already, through its ``constants`` module (read at each lookup).
    """
    import os

    os.environ["HF_HUB_CACHE"] = cache_dir
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_CACHE = cache_dir
        if offline:
            constants.HF_HUB_OFFLINE = True


# ---------------------------------------------------------------------- the driven loop
def replace_train_step(step: Any) -> Any:
    """Make Bridge's ``train()`` call ``step`` for each iteration (it looks the module-level
    ``train_step`` up when it starts); returns Bridge's own ``train_step``."""
    from megatron.bridge.training import train as bridge_train

    original = getattr(bridge_train, "_ncl_original_train_step", bridge_train.train_step)
    bridge_train._ncl_original_train_step = original  # type: ignore[attr-defined]
    bridge_train.train_step = step
    return original


def before_checkpoint_saves(hook: Callable[[], None]) -> None:
    """Call ``hook()`` before each checkpoint save Bridge's ``train()`` starts (its
    module-level ``save_checkpoint_and_time``, looked up at each call); a later call
    replaces the hook."""
    from megatron.bridge.training import train as bridge_train

    _SAVE_HOOK[:] = [hook]
    if not _once("save_hook"):
        return
    save = bridge_train.save_checkpoint_and_time

    @functools.wraps(save)
    def save_checkpoint_and_time(*args: Any, **kwargs: Any) -> Any:
        for before in _SAVE_HOOK:
            before()
        return save(*args, **kwargs)

    bridge_train.save_checkpoint_and_time = save_checkpoint_and_time


def initialize_parallel_state(cfg: Any, timeout_minutes: Optional[int] = None) -> Any:
    """Run megatron's ``initialize_model_parallel`` with the arguments Bridge's set-up uses
    (its layout, embedding ranks, group order, gloo choice) in the world that exists now;
    returns the new ``ProcessGroupCollection``. No re-seeding, no process-group init.
    ``timeout_minutes`` replaces ``dist.distributed_timeout_minutes`` for these groups."""
    import copy

    from megatron.bridge.models.gpt.gpt_builder import GPTModelConfig
    from megatron.bridge.models.hybrid.hybrid_builder import HybridModelConfig
    from megatron.bridge.training import initialize, setup

    model = cfg.model
    transformer = model.transformer if isinstance(model, (GPTModelConfig, HybridModelConfig)) \
        else model
    dist_config = cfg.dist
    if timeout_minutes is not None:
        dist_config = copy.copy(dist_config)
        dist_config.distributed_timeout_minutes = timeout_minutes
    return initialize._initialize_distributed(
        model_config=transformer, dist_config=dist_config,
        num_distributed_optimizer_instances=cfg.ddp.num_distributed_optimizer_instances,
        get_embedding_ranks=setup._resolve_embedding_ranks_fn(model, None),
        get_position_embedding_ranks=None)


def reset_loop_state(state: Any) -> None:
    """What Bridge's ``train()`` assumes at its start and a loop that died mid-iteration
    leaves behind: no timer running, the rerun state machine between iterations."""
    from megatron.core import rerun_state_machine as rsm

    timers = getattr(state, "_timers", None)
    for timer in (getattr(timers, "_timers", None) or {}).values():
        if getattr(timer, "_started", False):
            timer.reset()
    machine = rsm.get_rerun_state_machine()
    machine.state = rsm.RerunState.NOT_RUNNING_YET


def after_optimizer_setup(hook: Any) -> None:
    """Call ``hook(optimizer)`` on the optimizer Bridge's set-up builds, before it loads a
    checkpoint. (Resuming a ``torch_dist`` checkpoint reads Adam's ``step`` from the
    optimizer's state, which torch's Adam creates only at its first step: without Transformer
    Engine's fused Adam, the state must exist before the load.)"""
    if not _once("optimizer_hook"):
        return
    from megatron.bridge.training import setup as bridge_setup

    build = bridge_setup.setup_optimizer

    @functools.wraps(build)
    def setup_optimizer(*args: Any, **kwargs: Any) -> Any:
        optimizer, scheduler = build(*args, **kwargs)
        hook(optimizer)
        return optimizer, scheduler

    bridge_setup.setup_optimizer = setup_optimizer
