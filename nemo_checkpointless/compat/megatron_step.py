"""megatron-core's optimizer step and DDP communication state, as a driven loop needs them.

* :func:`deferred_update`: run the optimizer's own ``step()`` (grad preparation, found-inf
  check, grad norm, clipping, zero counting, skip decisions, whatever the release and the
  optimizer class do) but stop right before the update: ``step_with_ready_grads`` is held
  and reported instead of run. The caller applies the update later (the commit). The grad
  norm the step computed is captured on the way.
* :func:`discard_in_flight` / :func:`resync_params` / :func:`ensure_forward_pre_hooks`:
  after an abort, a DDP chunk may hold handles of collectives on destroyed groups and
  parameters whose all-gather never finished (``overlap_param_gather``), and a loop that
  died between disabling and enabling the forward pre-hooks leaves them off. These put the
  chunks back in the state a training loop expects when it starts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

_HELD = ("step_with_ready_grads", "get_grad_norm", "clip_grad_norm")


@dataclass
class HeldStep:
    """What ``optimizer.step()`` decided, before its update."""

    update: bool = False  # step() reached the update (not skipped: no inf, no norm skip)
    grad_norm: Optional[float] = None


@contextlib.contextmanager
def deferred_update(optimizer: Any) -> Iterator[HeldStep]:
    """Within the block, ``optimizer.step()`` stops before its update (see module doc)."""
    held = HeldStep()

    def hold_update() -> bool:
        held.update = True
        return True

    def capture(name: str) -> Any:
        method = getattr(optimizer, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            value = method(*args, **kwargs)
            held.grad_norm = None if value is None else float(value)
            return value
        return wrapper

    patched = {"step_with_ready_grads": hold_update,
               "get_grad_norm": capture("get_grad_norm"),
               "clip_grad_norm": capture("clip_grad_norm")}
    for name, value in patched.items():
        setattr(optimizer, name, value)  # instance attributes shadow the class's methods
    try:
        yield held
    finally:
        for name in _HELD:
            optimizer.__dict__.pop(name, None)


@contextlib.contextmanager
def no_timer_barriers(optimizer: Any) -> Iterator[None]:
    """The update is local to a rank: its timers must not barrier (barrier_with_L1_time)."""
    configs = [getattr(opt, "config", None)
               for opt in getattr(optimizer, "chained_optimizers", [optimizer])]
    configs = [c for c in configs if c is not None and getattr(c, "barrier_with_L1_time", False)]
    for config in configs:
        config.barrier_with_L1_time = False
    try:
        yield
    finally:
        for config in configs:
            config.barrier_with_L1_time = True


def _bucket_groups(chunks: list[torch.nn.Module]) -> Iterator[Any]:
    for chunk in chunks:
        yield from getattr(chunk, "bucket_groups", [])
        yield from getattr(chunk, "expert_parallel_bucket_groups", [])


def discard_in_flight(chunks: list[torch.nn.Module]) -> None:
    """Forget handles of grad reductions and param all-gathers started before an abort."""
    for group in _bucket_groups(chunks):
        group.param_gather_handle = None
        group.param_gather_dispatched = False
        group.grad_reduce_handle = None
        group.grad_reduce_finished = False


def resync_params(chunks: list[torch.nn.Module]) -> None:
    """All-gather every parameter from its owner's shard now (collective over DP), and
    leave the dispatch state as at start-up (the next forward pre-hook dispatches anew)."""
    for chunk in chunks:
        if not getattr(getattr(chunk, "ddp_config", None), "use_distributed_optimizer", False):
            continue
        with torch.no_grad():
            chunk.start_param_sync(force_sync=True)
        reset = getattr(chunk, "reset_param_sync_dispatch_state", None)
        if reset is not None:
            reset()
        else:
            for group in _bucket_groups([chunk]):
                group.param_gather_dispatched = False


def ensure_forward_pre_hooks(chunks: list[torch.nn.Module]) -> None:
    """Re-enable DDP's forward pre-hooks (param all-gather overlap) where they are off."""
    for chunk in chunks:
        if not getattr(chunk, "use_forward_hook", False):
            continue
        if len(getattr(chunk, "remove_forward_pre_hook_handles", {})) == 0:
            chunk.enable_forward_pre_hook()


def separate_adam_steps_on_load() -> bool:
    """Restore Adam's ``step`` of every parameter, each its own tensor, on a checkpoint load.

    Without Transformer Engine or Apex, megatron-core 0.19's ``DistributedOptimizer.
    load_state_dict`` reads the step from the checkpoint's param groups into one tensor
    shared by the state of every parameter (torch keeps it shared, so each optimizer step
    would then advance it once per parameter), and the parameter-state load that follows
    (``dp_reshardable``) writes the step of the state that was there before the load over
    it. The first update after a resume then used a wrong bias correction. (With TE's or
    Apex's fused Adam the step lives in the param groups and this path is not taken.)
    Returns whether the fix applies to the installed megatron-core.
    """
    from megatron.core.optimizer import distrib_optimizer as dopt

    if getattr(dopt, "HAVE_APEX_OR_TE", True):
        return False
    load = dopt.DistributedOptimizer.load_state_dict
    if getattr(load, "_ncl_separate_steps", False):
        return True

    def load_state_dict(self: Any, state_dict: Any) -> Any:
        groups = (state_dict.get("optimizer") or {}).get("param_groups") or []
        saved = {g["step"] for g in groups if g.get("step") is not None}
        result = load(self, state_dict)
        if len(saved) == 1:
            value = float(saved.pop())
            for state in self.optimizer.state.values():
                old = state.get("step")
                if old is not None:  # its own tensor, where torch's Adam keeps it
                    state["step"] = torch.tensor(value, dtype=torch.float32,
                                                 device=getattr(old, "device", "cpu"))
        return result

    load_state_dict._ncl_separate_steps = True  # type: ignore[attr-defined]
    dopt.DistributedOptimizer.load_state_dict = load_state_dict  # type: ignore[method-assign]
    return True
