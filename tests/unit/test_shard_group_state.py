"""A replacement takes a fused Adam's step counter (kept in param_groups, as Transformer
Engine's FusedAdam does) with the shard: without it, its next update uses step-1 bias
correction and leaves its replica; with it, the update is bit for bit the donor's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nemo_checkpointless.megatron.shards import (keeps_step_per_param,
                                                 load_optimizer_group_state,
                                                 make_state_contiguous,
                                                 optimizer_group_state,
                                                 optimizer_state_groups)
from nemo_checkpointless.replication.transfer import split_by_device


class GroupStepAdam(torch.optim.Optimizer):
    """Adam with the step counter in the param group (TE FusedAdam's bookkeeping)."""

    def __init__(self, params: Any, lr: float = 1e-2, betas=(0.9, 0.95), eps=1e-8) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            b1, b2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                m = state["exp_avg"] / (1 - b1 ** group["step"])
                v = state["exp_avg_sq"] / (1 - b2 ** group["step"])
                p.add_(m / (v.sqrt() + group["eps"]), alpha=-group["lr"])


@dataclass
class Leaf:
    """What megatron's optimizer wrapper exposes to shards.py: ``.optimizer``."""

    optimizer: Any


def params(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(40, generator=gen)
    return [flat[:25].view(5, 5).clone(), flat[25:].clone()]


def grads(step: int, ps: list[torch.Tensor]) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)


def test_group_step_travels_and_the_next_update_is_exact():
    donor_params = params(1)
    donor = Leaf(GroupStepAdam(donor_params))
    assert not keeps_step_per_param(donor.optimizer)
    make_state_contiguous(donor)                      # moments only: step is per group
    for step in (1, 2, 3):
        grads(step, donor_params)
        donor.optimizer.step()
    assert donor.optimizer.param_groups[0]["step"] == 3

    def replacement(with_group_state: bool) -> list[torch.Tensor]:
        mine = [torch.zeros_like(p) for p in donor_params]
        leaf = Leaf(GroupStepAdam(mine))
        for dst, src in zip(optimizer_state_groups(leaf), optimizer_state_groups(donor)):
            assert len(dst) == len(src)
            for d, s in zip(dst, src):
                d.copy_(s)                            # what the transfer does, byte for byte
        if with_group_state:
            load_optimizer_group_state(leaf, optimizer_group_state(donor))
        grads(4, mine)
        leaf.optimizer.step()
        return mine

    late, exact = replacement(False), replacement(True)
    grads(4, donor_params)
    donor.optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(exact, donor_params))
    assert not all(torch.equal(a, b) for a, b in zip(late, donor_params))


def test_torch_adam_keeps_steps_per_param_on_torchs_device_and_groups_split_by_device():
    ps = params(2)
    leaf = Leaf(torch.optim.Adam(ps, lr=1e-3))
    assert keeps_step_per_param(leaf.optimizer)
    groups = optimizer_state_groups(leaf)
    assert [len(g) for g in groups] == [2, 2, 2, 2]
    assert all(s.device.type == "cpu" and s.dtype == torch.float32 for s in groups[3])
    assert groups[1][0].data_ptr() + 25 * 4 == groups[1][1].data_ptr()  # one flat block
    on_device, on_host = split_by_device(groups)
    assert on_device == groups and on_host == []       # CPU rehearsal: one device, as before
    state = optimizer_group_state(leaf)
    assert state[0][0]["lr"] == 1e-3 and "params" not in state[0][0]
