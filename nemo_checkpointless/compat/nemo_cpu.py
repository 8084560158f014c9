"""NeMo 2.7.3's CUDA-only assumptions on paths the CPU rehearsal takes (beyond ``cpu.py``).

* ``nemo.lightning.io.pl._fix_tensors_device`` (after loading a distributed checkpoint)
  asserts ``torch.cuda.is_initialized()`` and moves CUDA tensors to the current device:
  without CUDA there is nothing to move.

:func:`enable` applies these once per process, only when the core's rehearsal mode is on
(no CUDA).
"""

from __future__ import annotations

from typing import Any

_done = False


def enable() -> None:
    global _done
    if _done:
        return
    from nemo.lightning.io import pl

    def keep_devices(checkpoint: Any) -> Any:  # CPU tensors stay where they are
        return checkpoint

    pl._fix_tensors_device = keep_devices
    _done = True
