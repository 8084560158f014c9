"""The pieces of one rank's state that a replacement needs, and where their replicas are.

* ``shard_key``: two ranks hold byte-identical optimizer state (fp32 main params, Adam
  moments, step) iff their keys are equal. Distributed optimizer: (tp, pp, rank inside the
  distributed-optimizer instance), so replicas sit in
  ``get_inter_distributed_optimizer_instance_group()``; plain optimizer: (tp, pp), every
  DP x CP peer.
* ``optimizer_state_tensors``: the shard, in a fixed order, creating Adam's state on a
  fresh (replacement) optimizer so that received bytes can land in place, on the main
  params' device.
* ``optimizer_group_state``: what lives in ``param_groups`` (a fused Adam's step, lr,
  weight decay); it travels in the state blob next to the shard.
* Model parameters are never shipped: they are the main params copied into the model
  (and all-gathered over the instance with the distributed optimizer), bit for bit what
  the original step produced.
"""

from __future__ import annotations

import pickle
import random
from typing import Any

import numpy as np
import torch

from ..device import HOST
from .optimizer import leaf_optimizers


def shard_key(use_distributed_optimizer: bool) -> tuple[int, int, int]:
    """Equal keys <=> identical optimizer state (see module docstring)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_rank()
    pp = ps.get_pipeline_model_parallel_rank()
    if not use_distributed_optimizer:
        return (tp, pp, 0)
    intra = ps.get_data_parallel_rank(with_context_parallel=True, partial_data_parallel=True)
    return (tp, pp, intra)


def _main_params(opt: Any) -> list[torch.Tensor]:
    """Main params in memory order (param groups interleave in the DDP buffer): the order
    depends only on the buffer layout, so every replica of a shard lists them alike."""
    params = [p for group in opt.optimizer.param_groups for p in group["params"]]
    storages: dict[int, int] = {}
    for p in params:
        storages.setdefault(p.untyped_storage().data_ptr(), len(storages))

    def key(p: torch.Tensor) -> tuple[int, int]:
        base = p.untyped_storage().data_ptr()
        return (storages[base], p.data_ptr() - base)

    return sorted(params, key=key)


def keeps_step_per_param(inner: Any) -> bool:
    """torch's Adam/AdamW keep ``step`` in each parameter's state; TE's and apex's
    FusedAdam (what megatron uses when either is installed) keep it in ``param_groups``."""
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))


def _step_placement(inner: Any, device: torch.device) -> tuple[torch.device, torch.dtype]:
    """Where torch's Adam puts ``step`` (its note "special device hosting for step"): on
    the parameter's device when ``capturable`` or ``fused``, else on the host, so that
    creating it here changes neither numerics nor speed."""
    flags = {(bool(g.get("capturable")), bool(g.get("fused"))) for g in inner.param_groups}
    if len(flags) != 1:
        raise ValueError(f"param groups mix Adam's capturable/fused flags {sorted(flags)}: "
                         "give every group the same flags")
    capturable, fused = flags.pop()
    dtype = torch.float32 if fused or torch.get_default_dtype() != torch.float64 \
        else torch.float64
    return (device if capturable or fused else HOST), dtype  # host: torch's own choice


def make_state_contiguous(optimizer: Any) -> None:
    """Create Adam's state up front in flat buffers on the main params' device:
    ``exp_avg``, ``exp_avg_sq`` (and, for torch's Adam, ``step``) of all of this rank's
    main params each live in one allocation.

    Adam creates its state lazily, one tensor per param, and updates it in place, so
    state created here is used as is (same values, same numerics). Laid out flat, the
    whole shard moves between peers (and to disk) as a few large messages without packing.
    A fused Adam that counts steps per param group (TE, apex) gets the two moments only,
    as megatron's own ``init_state_fn`` gives it; its step travels with
    :func:`optimizer_group_state`.
    """
    for opt in leaf_optimizers(optimizer):
        inner = opt.optimizer
        mains = [p for p in _main_params(opt) if not inner.state.get(p)]
        if not mains:
            continue
        total = sum(p.numel() for p in mains)
        dev = mains[0].device  # the rank's device (its main params live there)
        # written, not calloc'ed: the pages are resident before a peer streams state into
        # them (a replacement would otherwise take a page fault per 4 KB mid-transfer)
        exp_avg = torch.empty(total, dtype=mains[0].dtype, device=dev).zero_()
        exp_avg_sq = torch.empty(total, dtype=mains[0].dtype, device=dev).zero_()
        steps = None
        if keeps_step_per_param(inner):
            step_device, step_dtype = _step_placement(inner, dev)
            steps = torch.zeros(len(mains), dtype=step_dtype, device=step_device)
        offset = 0
        for i, p in enumerate(mains):
            n = p.numel()
            state = {"exp_avg": exp_avg[offset:offset + n].view_as(p),
                     "exp_avg_sq": exp_avg_sq[offset:offset + n].view_as(p)}
            inner.state[p] = state if steps is None else {"step": steps[i], **state}
            offset += n


def optimizer_state_tensors(optimizer: Any) -> list[torch.Tensor]:
    """This rank's optimizer shard in a fixed order: every main param, then every
    ``exp_avg``, every ``exp_avg_sq``, every ``step`` (neighbours in memory stay neighbours)."""
    return [t for group in optimizer_state_groups(optimizer) for t in group]


def optimizer_state_groups(optimizer: Any) -> list[list[torch.Tensor]]:
    """The shard as four groups (main params, exp_avg, exp_avg_sq, step); each group is
    one contiguous block of memory when the layout allows (see make_state_contiguous).
    The step group is empty for an optimizer that counts steps per param group, and lives
    on the host for torch's non-fused Adam (torch's placement); everything else on the
    main params' device."""
    make_state_contiguous(optimizer)
    mains: list[torch.Tensor] = []
    avgs: list[torch.Tensor] = []
    sqs: list[torch.Tensor] = []
    steps: list[torch.Tensor] = []
    for opt in leaf_optimizers(optimizer):
        for main in _main_params(opt):
            state = opt.optimizer.state[main]
            mains.append(main.data)
            avgs.append(state["exp_avg"])
            sqs.append(state["exp_avg_sq"])
            if "step" in state:
                steps.append(state["step"])
    return [mains, avgs, sqs, steps]


def optimizer_group_state(optimizer: Any) -> list[list[dict[str, Any]]]:
    """Every leaf optimizer's per-group state (all but ``params``): TE FusedAdam's ``step``,
    ``lr``, ``weight_decay``, betas, eps, megatron's multipliers. It is the same on every
    replica; a replacement must take it with the shard, or a fused Adam whose step lives
    here would apply step-1 bias correction to a late shard. Tensors become host copies.
    Include it in the state blob; apply it with :func:`load_optimizer_group_state`."""
    def plain(value: Any) -> Any:
        return value.detach().to(HOST, copy=True) if torch.is_tensor(value) else value

    return [[{k: plain(v) for k, v in group.items() if k != "params"}
             for group in opt.optimizer.param_groups]
            for opt in leaf_optimizers(optimizer)]


def load_optimizer_group_state(optimizer: Any, state: list[list[dict[str, Any]]]) -> None:
    """Apply :func:`optimizer_group_state` from a peer (tensors copied in place)."""
    leaves = leaf_optimizers(optimizer)
    shape = [len(o.optimizer.param_groups) for o in leaves]
    if shape != [len(groups) for groups in state]:
        raise ValueError(f"optimizer param groups differ from the donor's: this rank has "
                         f"{shape} groups per optimizer, the donor {[len(g) for g in state]} "
                         "(the same model and optimizer config must run on every rank)")
    for opt, groups in zip(leaves, state):
        for group, values in zip(opt.optimizer.param_groups, groups):
            for key, value in values.items():
                mine = group.get(key)
                if torch.is_tensor(mine) and torch.is_tensor(value):
                    mine.copy_(value)
                else:
                    group[key] = value.clone() if torch.is_tensor(value) else value


def copy_main_to_model(optimizer: Any) -> None:
    """Write this rank's main params into the model params (its shard, for DistOpt)."""
    for opt in leaf_optimizers(optimizer):
        opt._copy_main_params_to_model_params()


def capture_rng() -> dict[str, Any]:
    """Every random stream a step can touch (CPU, CUDA, megatron's TP tracker, numpy, random)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["tracker"].items()})
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def to_bytes(obj: Any) -> torch.Tensor:
    """A picklable object as a uint8 host tensor (small control payloads: RNG, counters);
    a sender moves it to its device."""
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)  # host: pickle


def from_bytes(tensor: torch.Tensor) -> Any:
    return pickle.loads(tensor.numpy().tobytes())
