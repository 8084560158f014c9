"""Stop a rank's forward and backward within one module when a failure is announced.

A rank learns of a failure elsewhere in the job in two ways: a collective it is in fails,
or its agent announces a new generation. On a GPU the second one aborts the communicators
and the next kernel launch or collective fails at once; a rank busy in forward/backward
(CPU rehearsal, or a long stretch of compute between collectives) would otherwise run on
until its next collective, which can be most of a step (``docs/benchmarks.md``).

:class:`ComputeInterrupt` puts a check at the layer boundaries of the model chunks
(:func:`boundaries`): a forward pre-hook on each of those modules, and a gradient hook on
each one's output so the backward pass checks too. The check is two lock-free integer reads; it raises
:class:`StepInterrupted` (a :class:`GenerationChanged`, which recovery handles) when the
agent announced a generation newer than the one this rank trains in.

Why this is safe: forward and backward happen before the commit barrier of their step
(``recovery/commit.py``), so an interrupted step was not applied by anyone and is redone
from the same data and RNG; the interrupted rank never sits inside a collective when it
raises (hooks run between modules), and its partial gradients are zeroed when the step is
redone. Peers blocked on it see its sockets shut down when it enters recovery.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from ..comm.rendezvous import GenerationChanged


class StepInterrupted(GenerationChanged):
    """Forward/backward stopped because a newer generation was announced."""


class ComputeInterrupt:
    """Module hooks that raise :class:`StepInterrupted` once ``pending()`` turns true.

    ``pending`` is read at every hooked boundary: it must be cheap and must not block
    (``AgentLink.interrupt_pending``).
    """

    def __init__(self, pending: Callable[[], bool]) -> None:
        self.pending = pending
        self._handles: list[Any] = []
        self._installed: set[int] = set()
        self.fired = 0

    def check(self) -> None:
        if self.pending():
            self.fired += 1
            raise StepInterrupted("a newer generation was announced: forward/backward "
                                  "stopped to recover")

    def _pre_forward(self, module: torch.nn.Module, args: Any) -> None:
        self.check()

    def _grad_hook(self, grad: torch.Tensor) -> torch.Tensor:
        self.check()
        return grad

    def _post_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        tensor = output[0] if isinstance(output, (tuple, list)) and output else output
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad and torch.is_grad_enabled():
            tensor.register_hook(self._grad_hook)

    def install(self, chunks: Iterable[torch.nn.Module]) -> int:
        """Hook the :func:`boundaries` of ``chunks`` (idempotent per module); returns how
        many modules were hooked."""
        added = 0
        for chunk in chunks:
            for module in boundaries(chunk):
                if id(module) in self._installed:
                    continue
                self._installed.add(id(module))
                self._handles.append(module.register_forward_pre_hook(self._pre_forward))
                self._handles.append(module.register_forward_hook(self._post_forward))
                added += 1
        return added

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._installed.clear()


def boundaries(chunk: torch.nn.Module) -> list[torch.nn.Module]:
    """Where the checks go: the chunk, its direct children, and every member of a
    ``ModuleList`` or ``Sequential`` inside it (transformer layers, experts), not every
    ``Linear`` and norm. A check per layer stops a rank within one layer's compute; a
    check per module cost about 2% of a tiny_gpt step on gloo (``docs/benchmarks.md``)."""
    found = [chunk, *chunk.children()]
    for module in chunk.modules():
        if isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)):
            found.extend(module.children())
    return found
