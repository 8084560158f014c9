"""Entry points for a front-end whose framework owns the training loop (NeMo 2: Lightning's fit).

Such a front-end calls these instead of :meth:`RecoveryLoop.run
<.generation.RecoveryLoop.run>`: ``join`` (a first start forms its world before the
framework builds in it), ``attach`` (the built driver), ``recover`` (a failure it caught
inside a step), ``step_done`` (a step committed) and ``finish`` (the job's end, once).
Each maps onto the generation loop's own phases; the mixin holds no state of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

from ..steps import StepDriver

if TYPE_CHECKING:
    from ..metrics.progress import Progress
    from ..metrics.timeline import RecoveryTimeline
    from .commit import CommitProtocol


class OwnedLoopEntries:
    """The owned-loop entry points of :class:`~.generation.RecoveryLoop` (a mixin)."""

    gen: int
    driver: Optional[StepDriver]
    timeline: Optional["RecoveryTimeline"]
    progress: "Progress"
    commit: "CommitProtocol"
    _joined_early: Optional[int]
    _built_in_world: bool

    # RecoveryLoop implements the _-prefixed phases called below

    def join(self) -> None:
        """Form the current generation's world now, before the front-end builds in it (a
        first start). A replacement builds in a world of fake groups instead and goes
        straight to :meth:`attach`."""
        self._join(self.gen)
        self._joined_early = self.gen

    def attach(self, driver: StepDriver) -> None:
        """Settle the generation with the front-end's built driver: rebuild and rebind its
        groups if it was built in a fake world, agree on the committed step, stream state
        to this rank if it replaces one. Failures meanwhile are recovered from."""
        if self._joined_early == self.gen:
            self.driver = driver
            self._built_in_world = True
        else:
            self._take_prebuilt(driver)
        self._settle(lambda: self._enter(self.gen))

    def recover(self, err: BaseException) -> None:
        """The front-end caught ``err`` inside a step: raise it unless it is recoverable;
        else abort, join the next generation and settle it (again after any failure in the
        meantime). Returns with the driver at the agreed committed step."""
        self._on_failure(err)
        self._settle(self._recover)

    def step_done(self, metrics: Any) -> None:
        """A step committed: a recovery before it is over; progress and the non-finite
        check; a stop every rank agreed on at its commit barrier (raises ``Stopped``)."""
        driver = self.driver
        assert driver is not None
        if self.timeline is not None:
            self._first_step_done()
        self.progress.on_step(metrics)
        if self.commit.stop_after is not None and driver.step >= self.commit.stop_after:
            self._stop()

    def finish(self) -> dict[str, Any]:
        """The job's end (summary, the final barrier); the caller recovers a failure in it
        and calls it again."""
        return self._finish()

    def _settle(self, attempt: Callable[[], None]) -> None:
        while True:
            try:
                attempt()
                return
            except BaseException as err:  # noqa: BLE001 - classified right below
                self._on_failure(err)
                attempt = self._recover
