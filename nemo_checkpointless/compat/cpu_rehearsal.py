"""The patches behind CPU rehearsal mode: megatron-core on gloo without CUDA.

megatron-core assumes a GPU in a handful of places (``device='cuda'`` literals,
``torch.cuda.current_device()``, CUDA streams and events, the CUDA RNG behind the
tensor-parallel RNG tracker, and ``Tensor.type()`` strings such as
``torch.cuda.FloatTensor``). This module maps each of them onto the CPU so that the
*same* megatron objects (GPTModel, DDP, DistributedOptimizer, the 1F1B pipeline
schedule) run on gloo ranks. It is the product's rehearsal mode: a whole job, its
failures and its recoveries can be played on a laptop before they are run on GPUs.

Rules:

* ``enable()`` is a no-op when CUDA is available: on a GPU nothing here is touched.
* The rest of the package calls :mod:`nemo_checkpointless.cpu` (the public switch), never
  this module.
* Every patch lives in this module and is applied once per process.
* The patches are process-wide by nature (torch.cuda is a module); they are kept as small
  as megatron needs and documented one by one below.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"enabled": False, "mode": None}


def cuda_available() -> bool:
    """True when a usable CUDA device exists (``NCL_FORCE_CPU=1`` forces the CPU path)."""
    if os.environ.get("NCL_FORCE_CPU", "0") == "1":
        return False
    return torch.cuda.is_available()


def enabled() -> bool:
    """True when the CPU rehearsal layer is active in this process."""
    return bool(_STATE["enabled"])


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # megatron passes torch.cuda.current_device() (an int) as a device
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments of torch calls to the CPU.

    Covers factory functions (``torch.empty(..., device='cuda')``), ``Tensor.to``,
    ``Tensor.cuda`` and ``torch.device`` arguments passed positionally to ``to``, and
    drops ``pin_memory=True`` (there is no pinned allocator without an accelerator; NeMo's
    Lightning layer logs scalars with ``torch.tensor(x, pin_memory=True)``).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = dict(kwargs, device="cpu")
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _Stream:
    """A CUDA stream stand-in: work on the CPU is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_Event":
        return event or _Event()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    @property
    def cuda_stream(self) -> int:
        return 0


class _Event:
    """A CUDA event stand-in."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = _Stream()

_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _Stream  # type: ignore[misc]
    cuda.Event = _Event  # type: ignore[misc]
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.set_stream = lambda stream: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0
    # The CUDA RNG becomes the CPU generator: megatron's tensor-parallel RNG tracker
    # forks it around dropout, which then runs on the CPU generator.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    nvtx = cuda.nvtx
    nvtx.range_push = lambda msg: 0
    nvtx.range_pop = lambda: 0
    nvtx.range = lambda *a, **k: contextlib.nullcontext()


def _patch_tensor_type() -> None:
    original = torch.Tensor.type

    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any):
        if dtype is None and not kwargs and self.device.type == "cpu":
            name = _TYPE_NAMES.get(self.dtype)
            if name is not None:
                return name
        if dtype is None:
            return original(self, **kwargs)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_  # type: ignore[method-assign]


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    tp_random._get_cuda_rng_state = get_state
    tp_random._set_cuda_rng_state = set_state


def enable() -> bool:
    """Activate CPU rehearsal mode if CUDA is absent. Returns True when active.

    Safe to call many times; the patches are applied once per process.
    """
    if cuda_available():
        return False
    with _LOCK:
        if _STATE["enabled"]:
            _ensure_mode_on_this_thread()
            return True
        _patch_torch_cuda()
        _patch_tensor_type()
        _patch_megatron_rng()
        _STATE["enabled"] = True
        _ensure_mode_on_this_thread()
        log.info("CPU rehearsal mode on: megatron-core runs on gloo without CUDA")
        return True


_THREAD = threading.local()


def _ensure_mode_on_this_thread() -> None:
    """Torch function modes are thread-local: push ours once on each calling thread."""
    if getattr(_THREAD, "mode", None) is None:
        mode = _CudaToCpu()
        mode.__enter__()
        _THREAD.mode = mode
