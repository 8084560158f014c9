"""A failure notice stops forward and backward at the next module (recovery/interrupt.py),
and the link raises that notice only for a generation newer than the active one."""

from __future__ import annotations

import time

import pytest
import torch

from nemo_checkpointless.comm.rendezvous import GenerationChanged
from nemo_checkpointless.launch.channel import Channel
from nemo_checkpointless.megatron.rebind import _key
from nemo_checkpointless.recovery.interrupt import ComputeInterrupt, StepInterrupted
from nemo_checkpointless.recovery.link import AgentLink


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def test_forward_and_backward_stop_once_a_notice_is_pending():
    pending = {"v": False}
    interrupt = ComputeInterrupt(lambda: pending["v"])
    model = _model()
    assert interrupt.install([model]) == 4
    assert interrupt.install([model]) == 0  # idempotent: a rebuilt trainer keeps one set

    loss = model(torch.randn(4, 8)).sum()  # no notice: an ordinary step
    loss.backward()
    assert interrupt.fired == 0

    loss = model(torch.randn(4, 8)).sum()
    pending["v"] = True  # the notice arrives between forward and backward
    with pytest.raises(StepInterrupted):
        loss.backward()
    with pytest.raises(StepInterrupted):
        model(torch.randn(4, 8))
    assert issubclass(StepInterrupted, GenerationChanged)  # what recovery handles

    interrupt.remove()
    model(torch.randn(4, 8)).sum().backward()  # hooks gone


def test_hooks_do_not_change_the_arithmetic():
    x = torch.randn(4, 8)
    plain = _model()
    plain(x).sum().backward()
    hooked = _model()
    ComputeInterrupt(lambda: False).install([hooked])
    hooked(x).sum().backward()
    for a, b in zip(plain.parameters(), hooked.parameters()):
        assert torch.equal(a.grad, b.grad)


def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_link_flags_only_a_generation_newer_than_the_active_one():
    agent, child = Channel.pair()
    link = AgentLink(Channel(child), on_new_generation=lambda gen: None,
                     abort_grace=60.0).start()
    try:
        assert not link.interrupt_pending()  # not active yet (a spare waiting for a rank)
        agent.send({"t": "gen", "gen": 0})
        link.activate(0)
        assert not link.interrupt_pending()
        agent.send({"t": "gen", "gen": 1})
        _wait(link.interrupt_pending)  # at once, not after the abort grace (60 s here)
        link.activate(1)
        assert not link.interrupt_pending()
    finally:
        agent.close()
        _wait(lambda: link.closed)


def test_paths_never_format_tensor_keys():
    t = torch.zeros(3)
    assert _key(t).startswith("<Tensor 0x")
    assert _key("a") == "'a'" and _key(3) == "3"


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(self.norm(x))


class _Stack(torch.nn.Module):
    """A transformer-shaped chunk: embedding, a ModuleList of layers, a head."""

    def __init__(self, calls: list) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(4, 8)
        self.layers = torch.nn.ModuleList(_Block() for _ in range(3))
        self.head = torch.nn.Linear(8, 1)
        self.calls = calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for i, layer in enumerate(self.layers):
            self.calls.append(i)
            x = layer(x)
        return self.head(x)


def test_checks_sit_at_layer_boundaries_not_at_every_module():
    """The chunk, its children and each layer of a ModuleList are hooked; the norms and
    Linears inside a layer are not (a check per module cost ~2% of a step on gloo)."""
    calls: list = []
    model = _Stack(calls)
    interrupt = ComputeInterrupt(lambda: False)
    hooked = interrupt.install([model])
    assert hooked == 1 + 3 + 3  # the chunk; embed, layers, head; the 3 layers
    inside = {id(m) for layer in model.layers for m in (layer.norm, layer.fc)}
    assert not inside & interrupt._installed

    # a notice that arrives while layer 0 runs stops forward before layer 1
    pending = {"v": False}
    stop = ComputeInterrupt(lambda: pending["v"])
    model2 = _Stack(calls)
    stop.install([model2])
    model2.layers[0].register_forward_hook(lambda *a: pending.update(v=True))
    with pytest.raises(StepInterrupted):
        model2(torch.randn(2, 4))
    assert calls[-1] == 1 and stop.fired == 1  # entered layer 1's call, stopped at its hook
