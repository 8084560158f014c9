"""``CheckpointlessMegatronStrategy``: NeMo's MegatronStrategy with the core's step hooks.

Every argument of ``nemo.lightning.MegatronStrategy`` is accepted and kept (the layout,
DDP config, checkpoint options, ``num_distributed_optimizer_instances``, ...). Added:

* ``tier`` / ``fallback``: the core's ``checkpointless`` settings (``config.py``);
* ``fault_plan``: the core's fault plan (``recovery/faults.py``), injected at the step
  phases on the ranks it names;
* a :class:`~nemo_checkpointless.steps.HookList` (``self.hooks``) holding the
  core's :class:`~nemo_checkpointless.recovery.commit.CommitProtocol` (commit barrier before
  the optimizer update, RNG snapshot at each step start) for tiers 3 and 4, and the fault
  injector. The optimizer (``nemo/optim.py``) and the callback (``nemo/callbacks.py``) call
  it at the phases of each step;
* CPU rehearsal: without CUDA, ``setup_distributed`` turns on the core's rehearsal mode
  (``nemo_checkpointless/cpu.py``) so NeMo's model, DDP and optimizer run on gloo.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Sequence

from nemo.lightning.pytorch.strategies import MegatronStrategy

from .. import cpu
from ..config import FALLBACKS, TIERS, ConfigError
from ..recovery.commit import CommitProtocol
from ..recovery.faults import FaultInjector, parse_plan
from ..steps import HookList
from .optim import CheckpointlessOptimizerModule

log = logging.getLogger(__name__)

RECOVERY_TIERS = ("tier3", "tier4")


class CheckpointlessMegatronStrategy(MegatronStrategy):
    """``nemo.lightning.MegatronStrategy`` plus the core's commit protocol and faults."""

    def __init__(self, *args: Any, tier: str = "tier4", fallback: str = "none",
                 fault_plan: Optional[Sequence[Any]] = None, **kwargs: Any) -> None:
        if tier not in TIERS:
            raise ConfigError(f"tier={tier!r}: use one of {', '.join(TIERS)}.")
        if fallback not in FALLBACKS:
            raise ConfigError(f"fallback={fallback!r}: use 'none' or 'disk'.")
        super().__init__(*args, **kwargs)
        self.tier = tier
        self.fallback = fallback
        self.fault_plan = list(fault_plan or [])
        self.hooks = HookList()
        self.commit: Optional[CommitProtocol] = None
        self.rehearsal = False
        # set by nemo/driver.py when the recovery manager drives the steps (ncl-launch):
        # its hooks (commit protocol, fault injector) replace the strategy's own
        self.driven_hooks: Optional[HookList] = None

    # ------------------------------------------------------------------ start-up
    def setup_distributed(self) -> None:
        if os.environ.get("NCL_AGENT_FD") is not None and self.tier in RECOVERY_TIERS \
                and self.driven_hooks is None:
            raise NotImplementedError(
                "under ncl-launch a NeMo recipe recovers in process only when the recovery "
                "manager drives its steps: run it through recipes/nemo_pretrain.py (which "
                "uses nemo_checkpointless.nemo.driver.run_recipe_under_agent), or launch "
                "with torchrun for a run without recovery")
        self.rehearsal = cpu.enable()
        super().setup_distributed()
        if self.driven_hooks is not None:
            self._finish_setup_in_given_world()
        self._install_hooks()

    def _finish_setup_in_given_world(self) -> None:
        """NeMo's ``setup_distributed`` returns early when a world exists (the driven job's
        fake one) and skips megatron's parallel state and the data sampler: do both."""
        from megatron.core import parallel_state
        from nemo.lightning._strategy_lib import init_model_parallel

        if not parallel_state.model_parallel_is_initialized():
            init_model_parallel(self.model)
            if self.data_sampler:
                self.data_sampler.setup(self.cluster_environment.global_rank())

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """In the fake world of a driven job's set-up every rank keeps its own value (what
        it broadcasts, a log directory, is the same on every rank)."""
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_backend() == "fake":
            return obj
        return super().broadcast(obj, src)

    def _install_hooks(self) -> None:
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        trainer = getattr(self, "trainer", None)
        max_steps = trainer.max_steps if trainer is not None and trainer.max_steps > 0 \
            else 1 << 30  # Lightning's -1: no limit
        faults = parse_plan(self.fault_plan, world, max_steps)
        if self.driven_hooks is not None:
            self.hooks = self.driven_hooks
            self._bind_optimizer_module()
            return
        hooks = []
        if self.tier in RECOVERY_TIERS:
            self.commit = CommitProtocol()
            hooks.append(self.commit)
        if faults:
            hooks.append(FaultInjector(faults, rank))
        self.hooks = HookList(hooks)
        self._bind_optimizer_module()

    def connect(self, model: Any) -> None:
        super().connect(model)
        self._bind_optimizer_module()

    def _bind_optimizer_module(self) -> None:
        module = getattr(self, "_lightning_module", None) or getattr(self, "model", None)
        optim = getattr(module, "optim", None)
        if isinstance(optim, CheckpointlessOptimizerModule):
            optim.bind(self.hooks, self._current_step)
        elif optim is not None and self.tier in RECOVERY_TIERS:
            raise ConfigError(
                f"tier={self.tier} needs the optimizer split at the commit point: use "
                "nemo_checkpointless.nemo.CheckpointlessOptimizerModule (apply_checkpointless "
                f"swaps it in), not {type(optim).__name__}.")

    def _current_step(self) -> int:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_step if trainer is not None else 0) + 1
