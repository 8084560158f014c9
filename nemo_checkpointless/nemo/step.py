"""The training step as one recovery point: the same data each attempt, replayed on a replacement.

NeMo's optimizer calls ``step(closure)`` once per iteration; the whole of it (training
step, gradient reduction, the update split at the commit barrier, the parameter
all-gather) is one recovery point (:meth:`StepPoint.compute`). An attempt after a
recovery draws the micro-batches the failed attempt drew (:class:`ReplayIterator`), so a
redone step computes from the same data; a step a replacement's peers computed already is
replayed from their record (what its training step logged and returned, its grad norm),
so the replacement's callbacks see it as its peers' did. A computed step is reported to
the recovery loop (progress, the non-finite check, an agreed stop: ``nemo/stop.py``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, TypeVar

import torch

from ..compat import lightning_fit
from ..steps import HookList, Phase, Stopped
from ..train.loop import finish_step
from .driver import batch_hash
from .journal import StepEntry, detached

if TYPE_CHECKING:
    from ..recovery.generation import RecoveryLoop
    from .driver import NemoStepDriver
    from .journal import Journal
    from .stop import StopRequest

T = TypeVar("T")
Position = tuple[int, int]


class ReplayIterator(Iterator[Any]):
    """The step's micro-batches: those already drawn in an earlier attempt of the same
    step first, then new ones from Lightning's iterator."""

    def __init__(self, source: Iterator[Any], drawn: list[Any]) -> None:
        self.source = source
        self.drawn = drawn
        self.next_index = 0

    def __next__(self) -> Any:
        if self.next_index < len(self.drawn):
            item = self.drawn[self.next_index]
        else:
            item = next(self.source)
            self.drawn.append(item)
        self.next_index += 1
        return item

    def __getattr__(self, name: str) -> Any:  # done / fetched / length of Lightning's
        return getattr(self.source, name)



class StepPoint:
    """The step of :class:`~.session.CheckpointlessSession` (a mixin)."""

    loop: Optional["RecoveryLoop"]
    trainer: Any
    driver: Optional["NemoStepDriver"]
    journal: "Journal"
    stop: "StopRequest"
    hooks: HookList
    micro: list[dict[str, torch.Tensor]]
    _forward_mark: int
    _ran: set[int]
    _replay: Optional[StepEntry]
    _data_step: int
    _drawn: list[Any]
    _pos_override: Optional[Callable[[Position], Position]]

    # CheckpointlessSession implements section and _guarded

    def compute(self, closure: Callable[[], Any]) -> tuple[Any, Optional[float], None]:
        """The optimizer's ``step(closure)``: the whole step as one recovery point."""
        driver = self.driver
        assert driver is not None
        step = int(self.trainer.global_step) + 1
        inner, after = lightning_fit.split_closure(closure)
        state: dict[str, Any] = {"after": False, "loss": None, "metrics": None}

        def hooks_after_closure() -> None:
            if not state["after"]:
                state["after"] = True
                after()

        def run(attempt: int) -> tuple[Any, Optional[float], None]:
            if driver.step < step:
                self._micro_reset()
                self.hooks(Phase.DATA, step)
                start = time.perf_counter()
                state["loss"] = inner()
                hooks_after_closure()
                loss = lightning_fit.closure_loss(self.journal.step(step).output)
                state["metrics"] = finish_step(driver, step, loss, start,
                                               batch_hash(self.micro), driver.clip_grad)
            elif step not in self._ran:  # a replacement: its peers computed this step
                self._replay = self.journal.steps.get(step)
                if self._replay is None:
                    raise RuntimeError(f"no record of step {step} to catch up from")
                try:
                    state["loss"] = inner()
                finally:
                    self._replay = None
                hooks_after_closure()
            entry = self.journal.step(step)
            return state["loss"], entry.grad_norm, None

        self._pos_override = lambda p: (p[0], p[1] + 1) if driver.step >= step else p
        try:
            result = self.section("step", run, skip=lambda: run(0))
        finally:
            self._pos_override = None
        loop = self.loop
        assert loop is not None
        if state["metrics"] is not None:  # computed here (not replayed, not rolled forward)
            self._guarded(lambda: self._step_done(loop, state["metrics"]))
        return result

    def _step_done(self, loop: RecoveryLoop, metrics: Any) -> None:
        try:
            loop.step_done(metrics)
        except Stopped as stop:  # agreed at this step's barrier: leave after its iteration
            self.stop.agreed(stop.step)

    def training_step(self, run: Callable[[Iterator[Any]], Any],
                      dataloader_iter: Iterator[Any]) -> Any:
        """The strategy's ``training_step``: the same micro-batches in every attempt of a
        step; a replay logs what the peer's step logged and returns its output."""
        module = self.trainer.lightning_module
        step = int(self.trainer.global_step) + 1
        if self._replay is not None:
            for name, value, kwargs in self._replay.logs:
                module.log(name, value, **kwargs)
            return self._replay.output
        if self._data_step != step:
            self._data_step, self._drawn = step, []
        entry = StepEntry()
        with lightning_fit.recording_logs(module, entry.logs):
            out = run(ReplayIterator(dataloader_iter, self._drawn))
        entry.output = detached(out)
        self.journal.steps[step] = entry
        self._ran.add(step)
        return out

    def _committed(self, step: int, metrics: Any, prepared: Any) -> None:
        entry = self.journal.step(step)
        entry.grad_norm = None if prepared.found_inf else float(prepared.grad_norm)
        record = metrics.record()
        record.pop("lr", None)
        record.pop("time", None)
        entry.record = record

    def on_microbatch(self, batch: Any) -> None:
        """NeMo's Megatron-step event, once per micro-batch: the digest and ``forward``."""
        tokens = batch.get("tokens") if isinstance(batch, dict) else None
        if tokens is not None:
            self.micro.append({"tokens": tokens})
        step = int(self.trainer.global_step) + 1
        if self._forward_mark != step:
            self._forward_mark = step
            self.hooks(Phase.FORWARD, step)

    def _micro_reset(self) -> None:
        self.micro = []
        self._forward_mark = 0
