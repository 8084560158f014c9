"""recipes/pretrain.py with one test-only misbehaviour, chosen by environment variables.

* ``NCL_TEST_GIL_RANK=R NCL_TEST_GIL_S=S``: rank R, as soon as its agent link thread runs
  (in set-up, before its first step), makes a C call that keeps the GIL for S seconds
  (``usleep`` through ``ctypes.PyDLL``, which does not release the GIL): no thread of the
  process runs meanwhile, the heartbeat thread included.
* ``NCL_TEST_BLOCK_RANK=R NCL_TEST_BLOCK_STEP=N``: rank R, before step N, blocks for good
  with the GIL released (its heartbeat goes on), as a rank waiting on a hung GPU does; the
  other ranks wait for it in their first collective of step N.

Only the first process of that rank misbehaves (not a replacement or a warm spare).
"""

from __future__ import annotations

import ctypes
import os
import runpy
import sys
import threading
import time
from pathlib import Path

PRETRAIN = Path(__file__).resolve().parents[3] / "recipes" / "pretrain.py"


def _first_process_of(var: str) -> bool:
    rank = os.environ.get(var)
    return (rank is not None and os.environ.get("RANK") == rank
            and os.environ.get("NCL_SPARE") != "1" and os.environ.get("NCL_REPLACEMENT") == "0")


def _say(text: str) -> None:
    print(f"[test] rank {os.environ.get('RANK')} {text}", file=sys.stderr, flush=True)


def _hold_gil_in_setup(seconds: float) -> None:
    while not any(t.name == "ncl-agent-link" for t in threading.enumerate()):
        time.sleep(0.01)
    time.sleep(0.3)  # let the link send its first heartbeats
    _say(f"holds the GIL for {seconds:g}s in set-up")
    t0 = time.monotonic()
    ctypes.PyDLL(None).usleep(int(seconds * 1e6))
    _say(f"released the GIL after {time.monotonic() - t0:.1f}s")


if _first_process_of("NCL_TEST_GIL_RANK"):
    threading.Thread(target=_hold_gil_in_setup, args=(float(os.environ["NCL_TEST_GIL_S"]),),
                     daemon=True).start()

if _first_process_of("NCL_TEST_BLOCK_RANK"):
    from nemo_checkpointless.train.loop import Trainer

    _block_at = int(os.environ["NCL_TEST_BLOCK_STEP"])
    _train_step = Trainer.train_step

    def train_step(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if self.step + 1 == _block_at:
            _say(f"blocks before step {_block_at} with the GIL released")
            while True:
                time.sleep(3600)
        return _train_step(self, *args, **kwargs)

    Trainer.train_step = train_step

runpy.run_path(str(PRETRAIN), run_name="__main__")
