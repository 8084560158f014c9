"""``CheckpointlessMegatronStrategy``: NeMo's MegatronStrategy with the core's step hooks.

Every argument of ``nemo.lightning.MegatronStrategy`` is accepted and kept (the layout,
DDP config, checkpoint options, ``num_distributed_optimizer_instances``, ...). Added:

* ``tier`` / ``fallback``: the core's ``checkpointless`` settings: the tier's preset of
  config parts (``config.CheckpointlessConfig.preset``), held as ``self.checkpointless``;
* ``fault_plan``: the core's fault plan (``recovery/faults.py``), injected at the step
  phases on the ranks it names;
* the step hooks (``self.hooks``): under ``ncl-launch`` those of the rank's recovery
  session (``nemo/session.py``: commit barrier, fault injector, recovery points); under
  torchrun the core's :class:`~nemo_checkpointless.recovery.commit.CommitProtocol` (when
  the parts recover in process) and the fault injector, without recovery;
* under ``ncl-launch``: megatron's parallel state is built by NeMo in the world the
  session formed (a first start) or in a world of fake groups (a replacement), with its
  arguments recorded for the rebuild after a recovery; the training step, checkpoint
  saves and removals go through the session;
* CPU rehearsal: without CUDA, ``setup_distributed`` turns on the core's rehearsal mode
  (``nemo_checkpointless/cpu.py``) so NeMo's model, DDP and optimizer run on gloo.
"""

from __future__ import annotations

import logging
import os
import traceback
from typing import Any, Optional, Sequence

from nemo.lightning.pytorch.strategies import MegatronStrategy

from .. import cpu
from ..config import FALLBACKS, CheckpointlessConfig, ConfigError
from ..launch.channel import ENV_FD
from ..recovery.commit import CommitProtocol
from ..recovery.faults import FaultInjector, parse_plan
from ..steps import HookList
from . import session as sessions
from .optim import CheckpointlessOptimizerModule

log = logging.getLogger(__name__)


class CheckpointlessMegatronStrategy(MegatronStrategy):
    """``nemo.lightning.MegatronStrategy`` plus the core's commit protocol and faults."""

    def __init__(self, *args: Any, tier: str = "tier4", fallback: str = "none",
                 fault_plan: Optional[Sequence[Any]] = None, **kwargs: Any) -> None:
        if fallback not in FALLBACKS:
            raise ConfigError(f"fallback={fallback!r}: use 'none' or 'disk'.")
        self.checkpointless = CheckpointlessConfig.preset(tier, fallback=fallback)
        if kwargs.get("cluster_environment") is None and os.environ.get(ENV_FD) is not None:
            kwargs["cluster_environment"] = _agent_environment()
        super().__init__(*args, **kwargs)
        self.tier = tier
        self.fallback = fallback
        self.fault_plan = list(fault_plan or [])
        self.hooks = HookList()
        self.commit: Optional[CommitProtocol] = None
        self.rehearsal = False
        self.session: Optional[sessions.CheckpointlessSession] = None

    # ------------------------------------------------------------------ start-up
    def setup_distributed(self) -> None:
        self.session = sessions.current()
        if self.session is None and os.environ.get(ENV_FD) is not None:
            raise ConfigError(
                "under ncl-launch a NeMo recipe runs through nemo_checkpointless's runner, "
                "which opens the rank's recovery session before the recipe is built: "
                "`ncl-launch ... recipes/nemo_pretrain.py recipe=...`, `ncl-launch ... "
                "-m nemo_checkpointless.nemo.run <module:function|serialized recipe>`, or "
                "NeMo-Run with nemo_checkpointless.nemo.NclLaunch; use torchrun for a run "
                "without recovery")
        if self.session is not None:
            # gloo side groups cannot form in a replacement's fake world; every rank then
            # builds (and rebuilds) the same groups without them
            self.use_gloo_process_groups = False
        self.rehearsal = cpu.enable()
        if self.rehearsal:
            from ..compat import nemo_cpu

            nemo_cpu.enable()
        super().setup_distributed()  # NeMo returns early when the world exists
        if self.session is not None:
            self.session.layout.build(self.model)  # NeMo's set-up, arguments recorded
            if self.data_sampler:
                self.data_sampler.setup(self.cluster_environment.global_rank())
        self._install_hooks()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """In a replacement's fake world every rank keeps its own value (what Lightning
        broadcasts at set-up, a checkpoint directory, is the same on every rank)."""
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_backend() == "fake":
            return obj
        return super().broadcast(obj, src)

    def _install_hooks(self) -> None:
        import torch.distributed as dist

        if self.session is not None:
            self.hooks = self.session.hooks
            self._bind_optimizer_module()
            return
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        trainer = getattr(self, "trainer", None) or getattr(self.lightning_module, "trainer",
                                                             None)
        max_steps = trainer.max_steps if trainer is not None and trainer.max_steps > 0 \
            else 1 << 30  # Lightning's -1: no limit
        faults = parse_plan(self.fault_plan, world, max_steps)
        hooks = []
        if self.checkpointless.recovery != "none":
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
            optim.bind(self.hooks, self._current_step, lambda: self.session, self._record_step)
        elif optim is not None and self.checkpointless.recovery != "none":
            raise ConfigError(
                f"tier={self.tier} recovers in process and needs the optimizer split at the "
                "commit point: use "
                "nemo_checkpointless.nemo.CheckpointlessOptimizerModule (apply_checkpointless "
                f"swaps it in), not {type(optim).__name__}.")

    def _current_step(self) -> int:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_step if trainer is not None else 0) + 1

    def _record_step(self, step: int, loss: Any, prepared: Any) -> None:
        """Without the agent: the step's ``metrics.jsonl`` record (the callback writes it)."""
        import math
        import time

        from ..compat.lightning_fit import closure_loss
        from .callbacks import _local
        from .driver import batch_hash

        steps = _local(self.trainer)
        value = closure_loss(loss)
        gbs = int(self.data_sampler.global_batch_size)
        steps.records[step] = {
            "step": step, "loss": value,
            "loss_hex": value.hex() if math.isfinite(value) else repr(value),
            "consumed_samples": step * gbs,
            "step_time_s": round(time.perf_counter() - steps.started, 6),
            "grad_norm": None if prepared.found_inf else float(prepared.grad_norm),
            "batch_hash": batch_hash(steps.micro)}

    # ------------------------------------------------------------------ recovery points
    def training_step(self, dataloader_iter: Any, *args: Any, **kwargs: Any) -> Any:
        if self.session is None:
            return super().training_step(dataloader_iter, *args, **kwargs)
        parent = super()
        return self.session.training_step(
            lambda it: parent.training_step(it, *args, **kwargs), dataloader_iter)

    def save_checkpoint(self, checkpoint: dict, filepath: Any,
                        storage_options: Optional[Any] = None) -> None:
        if self.session is None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        parent = super()
        return self.session.save_checkpoint(
            lambda ckpt: parent.save_checkpoint(ckpt, filepath, storage_options), checkpoint)

    def remove_checkpoint(self, filepath: Any) -> None:
        """Idempotent: a replacement rank 0 may repeat a removal its predecessor did."""
        from nemo.lightning.ckpt_utils import ckpt_to_dir

        if self.session is not None and not os.path.lexists(ckpt_to_dir(filepath)):
            return
        super().remove_checkpoint(filepath)

    def load_checkpoint(self, checkpoint_path: Any, selective_restore: bool = False) -> Any:
        """NeMo's load, with Adam's state created first: megatron-core 0.16's distributed
        optimizer builds the sharded state dict to load into from its own state, and
        asserts (``len(steps) == 1``) while Adam has not made it yet (before a first step).
        Created as Adam would create it (zeros, step 0), then overwritten by the load."""
        from ..megatron.shards import make_state_contiguous

        for optimizer in self.optimizers:
            make_state_contiguous(getattr(optimizer, "mcore_optimizer", optimizer))
        return super().load_checkpoint(checkpoint_path, selective_restore)

    def load_optimizer_state_dict(self, checkpoint: Any, selective_restore: bool = False) -> None:
        """NeMo's, made exact for torch's Adam (no Transformer Engine / Apex):

        * without autograd: with fp32 parameters megatron's main params are views of the
          model's (leaves that require grad), and megatron-core 0.16 copies the loaded
          state into them in place;
        * Adam's step count, one tensor per parameter: megatron-core 0.16 keeps the step in
          the param groups of its checkpoint, gives every parameter's state one *shared*
          step tensor (which torch's Adam then advances once per parameter at every step),
          and copies over it a per-parameter step the checkpoint does not hold (the value
          of the state it loaded into). Each parameter's step is set from its group."""
        import torch

        from ..megatron.optimizer import leaf_optimizers

        with torch.no_grad():
            super().load_optimizer_state_dict(checkpoint, selective_restore)
            for optimizer in self.optimizers:
                for leaf in leaf_optimizers(getattr(optimizer, "mcore_optimizer", optimizer)):
                    inner = leaf.optimizer
                    for group in inner.param_groups:
                        if "step" not in group:
                            continue
                        for param in group["params"]:
                            state = inner.state.get(param)
                            if state is not None and "step" in state:
                                old = state["step"]  # where torch's Adam keeps it
                                state["step"] = torch.tensor(float(group["step"]),
                                                             dtype=torch.float32,
                                                             device=old.device)

    def on_exception(self, exception: BaseException) -> None:
        """Under ncl-launch an error that escaped recovery ends this process at once, as a
        failed rank (Lightning's teardown could wait on peers); the agent replaces it."""
        if self.session is None:
            return super().on_exception(exception)
        log.error("rank failed: %s", "".join(traceback.format_exception(exception))[-4000:])
        logging.shutdown()
        os._exit(1)


def _agent_environment() -> Any:
    """Lightning's cluster environment for a rank that ``ncl-launch`` started.

    The agent defines the world (``RANK``, ``LOCAL_RANK``, ``NODE_RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``/``MASTER_PORT``), as it does off a cluster, where Lightning picks its
    plain ``LightningEnvironment`` for it. Inside a Slurm step Lightning would pick
    ``SLURMEnvironment`` instead, which reads the agent's step (one task per node:
    ``SLURM_NTASKS=1``, ``SLURM_PROCID=0``) as the world and stops with "You set
    `devices=2` in Lightning, but the number of tasks per node configured in SLURM
    `--ntasks-per-node=1` does not match"."""
    from lightning.pytorch.plugins.environments import LightningEnvironment

    return LightningEnvironment()
