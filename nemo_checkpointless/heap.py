"""Keep full passes of Python's cyclic garbage collector off the step and recovery paths.

A full (generation 2) collection walks every object the collector tracks, and a rank that
has imported torch and megatron-core holds hundreds of thousands; Python starts one
whenever the oldest generation grows by a quarter, which is what happens while a
replacement builds its optimizer, scheduler and data, on the recovery's critical path
(measured: ``docs/benchmarks.md``, "Recovery time").

:func:`freeze` moves every object alive now into the collector's permanent generation
(``gc.freeze``, O(1)), which later passes skip; they then walk only what was created since.
It is called where the long-lived objects are complete: in the zygote once its modules are
imported (also sparing forked ranks the copy-on-write of every object header a pass would
touch), in a warm spare after it prebuilt its model, and at the end of a rank's set-up.
Frozen objects are still freed by reference counting; only cycles among them stay.
``NCL_GC_FREEZE=0`` turns it off.
"""

from __future__ import annotations

import gc
import logging
import os
import time

log = logging.getLogger(__name__)


def freeze(where: str, collect: bool = False) -> int:
    """Freeze the objects alive now; with ``collect``, first free the garbage among them
    (a full pass: only where time does not matter). Returns the number now frozen."""
    if os.environ.get("NCL_GC_FREEZE", "1") == "0":
        return 0
    t0 = time.perf_counter()
    if collect:
        gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("%s: %d objects frozen out of the collector's passes (%.3fs)", where, frozen,
              time.perf_counter() - t0)
    return frozen
