"""Generation-scoped rendezvous: every rank of generation G meets, then forms the world.

Keys live under ``rdzv/<G>/`` and ``pg/<G>/``, so a stale generation's keys are never
read by a newer one. The world itself is formed by :func:`comm.init.form_world` (groups
built by their members only, batched address exchange on gloo). The wait is cancellable: a
rank that learns of a newer generation while waiting leaves at once (``GenerationChanged``).
"""

from __future__ import annotations

import datetime
import time
from typing import Any, Callable

from .init import form_world


class GenerationChanged(RuntimeError):
    """A newer generation started while this rank was joining or training."""


class RendezvousTimeout(RuntimeError):
    """Not every rank arrived in time."""


def rendezvous(store: Any, gen: int, rank: int, world_size: int, backend: str,
               timeout: datetime.timedelta, pg_timeout: datetime.timedelta,
               cancelled: Callable[[], bool]) -> None:
    """Wait until all ``world_size`` ranks arrived at ``gen``, then init the world group."""
    arrived = int(store.add(f"rdzv/{gen}/arrived", 1))
    if arrived == world_size:
        store.set(f"rdzv/{gen}/complete", "1")
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        if cancelled():
            raise GenerationChanged(f"generation moved past {gen} during rendezvous")
        try:
            store.wait([f"rdzv/{gen}/complete"], datetime.timedelta(milliseconds=100))
            break
        except Exception:
            if time.monotonic() > deadline:
                have = int(store.add(f"rdzv/{gen}/arrived", 0))
                raise RendezvousTimeout(
                    f"generation {gen}: only {have}/{world_size} ranks arrived within "
                    f"{timeout.total_seconds():.0f}s (NCL_RECOVERY_TIMEOUT_S); is a node down "
                    "with no replacement?") from None
    if hasattr(store, "drop_links"):  # a server of the last generation may be gone
        store.drop_links()
    form_world(store, rank, world_size, gen, backend, pg_timeout)
