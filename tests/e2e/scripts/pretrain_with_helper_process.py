"""recipes/pretrain.py whose rank ``NCL_TEST_HELPER_RANK`` first starts a helper process as
megatron's async checkpoint writer does (a ``spawn``-context ``multiprocessing.Manager``)
and writes the helper's pid to ``NCL_TEST_HELPER_PID_FILE``. Only the rank's first process
does (not a replacement or a warm spare)."""

from __future__ import annotations

import multiprocessing
import os
import runpy
import sys
from pathlib import Path

PRETRAIN = Path(__file__).resolve().parents[3] / "recipes" / "pretrain.py"

if __name__ == "__main__":  # not in the helper, which imports this file as __mp_main__
    manager = None
    if (os.environ.get("RANK") == os.environ.get("NCL_TEST_HELPER_RANK")
            and os.environ.get("NCL_SPARE") != "1"
            and os.environ.get("NCL_REPLACEMENT") == "0"):
        manager = multiprocessing.get_context("spawn").Manager()
        pid = manager._process.pid  # noqa: SLF001 - the server process
        Path(os.environ["NCL_TEST_HELPER_PID_FILE"]).write_text(str(pid))
        print(f"[test] rank {os.environ['RANK']} started helper process {pid}",
              file=sys.stderr, flush=True)
    runpy.run_path(str(PRETRAIN), run_name="__main__")
