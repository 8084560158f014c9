"""NeMo's Megatron optimizer module, with the step split at the commit point.

NeMo's ``MegatronOptimizerModule`` builds megatron's optimizer and wraps it in
``McoreDistributedOptimizer``, whose ``step()`` is megatron's whole step (grad copy, inf
check, clipping, Adam, param all-gather). The commit protocol needs the step cut where the
core's loop cuts it (``megatron/optimizer.py``): ``prepare`` (collective, redoable), the
commit barrier, ``apply_update`` (the single local mutation), ``gather_params``.

:class:`CheckpointlessOptimizerModule` keeps every argument of NeMo's module (config, LR
scheduler, weight-decay / LR-scale conditions) and differs in two things only:

* the optimizer it returns is :class:`CheckpointlessMcoreOptimizer`, whose ``step()`` runs
  the core's split step and calls the step hooks (commit protocol, fault injector) at the
  ``grad_sync``, ``optimizer`` and ``param_sync`` phases;
* it builds megatron's optimizer through the megatron-core 0.16 API
  (``config_overrides``). NeMo 2.7.3's ``setup_megatron_optimizer`` passes
  ``no_weight_decay_cond=`` / ``scale_lr_cond=`` / ``lr_mult=`` to
  ``get_megatron_optimizer``, which megatron-core 0.16.1 no longer accepts
  (``TypeError: get_megatron_optimizer() got an unexpected keyword argument
  'no_weight_decay_cond'``); with the defaults (no conditions, ``lr_mult=1``) the two
  calls build the same param groups.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from megatron.core.optimizer import get_megatron_optimizer
from nemo.core.optim import McoreDistributedOptimizer
from nemo.lightning.megatron_parallel import MegatronParallel
from nemo.lightning.pytorch.optim.megatron import MegatronOptimizerModule

from ..megatron import optimizer as mopt
from ..steps import HookList, Phase


class CheckpointlessMcoreOptimizer(McoreDistributedOptimizer):
    """``McoreDistributedOptimizer`` whose step is split at the commit point.

    ``hooks`` is the strategy's HookList; ``step_of()`` returns the step being run
    (Lightning's ``global_step + 1``); ``session_of()`` the rank's recovery session under
    ``ncl-launch`` (None under torchrun), which then runs the whole step as a recovery
    point (``nemo/session.py``). ``last`` keeps the latest step's
    :class:`~nemo_checkpointless.megatron.optimizer.StepResult`.
    """

    def __init__(self, optim: Any, hooks: HookList, step_of: Callable[[], int],
                 session_of: Callable[[], Any] = lambda: None,
                 on_step: Optional[Callable[[int, Any, Any], None]] = None) -> None:
        super().__init__(optim)
        self.hooks = hooks
        self.step_of = step_of
        self.session_of = session_of
        self.on_step = on_step
        self.last: Optional[mopt.StepResult] = None

    def step(self, closure: Optional[Callable[[], Any]] = None):
        session = self.session_of()
        if session is not None:
            return session.compute(closure)
        loss = closure() if closure is not None else None
        step = self.step_of()
        clip = float(getattr(self.mcore_optimizer.config, "clip_grad", 0.0) or 0.0)
        prepared = mopt.prepare(self.mcore_optimizer, clip)
        if self.on_step is not None:  # the record of the step (torchrun: no recovery)
            self.on_step(step, loss, prepared)
        self.hooks(Phase.OPTIMIZER, step)  # commit barrier: the step is decided here
        if not prepared.found_inf:
            mopt.apply_update(self.mcore_optimizer)
        self.hooks(Phase.PARAM_SYNC, step)
        self._gather()
        self.last = prepared
        grad_norm = None if prepared.found_inf else prepared.grad_norm
        return loss, grad_norm, None

    def _gather(self) -> None:
        chunks = getattr(self, "model_chunks", None)
        if chunks:
            mopt.gather_params(chunks, self.mcore_optimizer)


class CheckpointlessOptimizerModule(MegatronOptimizerModule):
    """NeMo's ``MegatronOptimizerModule`` returning a commit-point-split optimizer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hooks = HookList()
        self.step_of: Callable[[], int] = lambda: 0
        self.session_of: Callable[[], Any] = lambda: None
        self.on_step: Optional[Callable[[int, Any, Any], None]] = None

    def bind(self, hooks: HookList, step_of: Callable[[], int],
             session_of: Callable[[], Any], on_step: Optional[Callable] = None) -> None:
        """Called by the strategy before the optimizer is built."""
        self.hooks = hooks
        self.step_of = step_of
        self.session_of = session_of
        self.on_step = on_step

    def optimizers(self, model: MegatronParallel) -> list:
        if not isinstance(model, MegatronParallel):
            raise ValueError("Model must be an instance of MegatronParallel")
        if self.no_weight_decay_cond is not None or self.scale_lr_cond is not None \
                or self.lr_mult != 1.0:
            raise NotImplementedError(
                "no_weight_decay_cond / scale_lr_cond / lr_mult are arguments of the "
                "megatron-core 0.15 optimizer API; with megatron-core 0.16 express them as "
                "OptimizerConfig overrides, or leave them at their defaults")
        from nemo.utils import AppState

        chunks = [m.module for m in model]  # megatron's DDP modules
        with _param_group_keys_gather():
            mcore_opt = get_megatron_optimizer(
                self.config, chunks,
                use_gloo_process_groups=AppState().use_gloo_process_groups)
        opt = CheckpointlessMcoreOptimizer(mcore_opt, self.hooks, self.step_of,
                                           self.session_of, self.on_step)
        opt.model_chunks = chunks
        return [opt]

    def finalize_model_grads(self, *args: Any, **kwargs: Any):
        self.hooks(Phase.GRAD_SYNC, self.step_of())
        return super().finalize_model_grads(*args, **kwargs)


def _param_group_keys_gather():
    """megatron's optimizer constructor all-gathers every rank's param-group keys; in the
    fake world a replacement builds in (``nemo/session.py``) that gather returns nothing, so
    it is answered locally (every rank of a dense GPT has the same keys)."""
    import contextlib

    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "fake":
        from ..compat.megatron import local_all_gather_object

        return local_all_gather_object()
    return contextlib.nullcontext()
