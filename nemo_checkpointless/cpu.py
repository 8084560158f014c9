"""CPU rehearsal mode: the same megatron-core job on gloo ranks without a GPU.

A whole job, its failures and its recoveries can be played on a laptop before they run on
GPUs. This is the switch; the patches that make megatron-core run without CUDA are in
:mod:`nemo_checkpointless.compat.cpu_rehearsal` (the compatibility layer).
"""

from __future__ import annotations

from .compat.cpu_rehearsal import cuda_available, enable, enabled

__all__ = ["cuda_available", "enable", "enabled"]
