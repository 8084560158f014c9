"""Which megatron-core releases the package supports, and its version-dependent surfaces.

Supported: megatron-core 0.15 to 0.19 (:data:`SUPPORTED`). 0.17 and later need Python 3.12.
CI runs two of them (:data:`TESTED`): 0.16.1 on Python 3.11 (``make test``) and 0.19.2 on
Python 3.12 (``make test-latest``); the newest patch of each other series runs with
``make test-megatron MCORE=<release>`` (:data:`RUN_BY_HAND`, not in CI; docs/bridge.md,
"Supported versions"). Everything here is found by feature detection, never by comparing
version numbers; the number only goes into messages.

* :func:`legacy_tokenizer_base`: the base class of the package's tokenizer. megatron-core
  up to 0.16 ships ``megatron.core.datasets.megatron_tokenizer.MegatronLegacyTokenizer``
  (``MegatronTokenizer`` before 0.14); 0.19 removed the module. The datasets only read
  ``unique_identifiers``, ``vocab_size``, ``eod`` and, optionally, ``pad``/``eos``
  (:class:`DatasetTokenizerBase` is the package's own equivalent of the removed class).
* :func:`forget_collective_caches`: megatron-core 0.19's optimizers cache the answer of a
  collective (``has_grad_norm_group``: one all-reduce over the grad-stats group, the first
  time a step asks). A replacement rank starts with an empty cache and would run that
  all-reduce alone while its peers skip it: every rank forgets the cache after a recovery
  rebuilt the groups, so all of them ask again, together, at the next step.
* :func:`dataset_cache_probe`: a ``GPTDataset`` far enough built to know the name of its
  index cache, without building, reading or writing the indices. megatron-core 0.16 and
  later defer loading the indices (``defer_npy_index_mmap``) and tell the path they would
  load; 0.15 builds the indices in the constructor and, on a cache miss, saves them into
  the cache itself (not atomically): there only the base class's constructor runs, which
  computes the cache key, and the path is not told.
* :func:`check_megatron_core`: the start-up check. It probes every megatron-core surface
  the package calls and names the supported versions when one is missing.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

SUPPORTED = ("0.15", "0.16", "0.17", "0.18", "0.19")
TESTED = {"0.16.1": "Python 3.11 (make test)", "0.19.2": "Python 3.12 (make test-latest)"}
# the other series' newest patches: requirements/mcore-<release>.txt, make test-megatron
RUN_BY_HAND = {"0.15.3": "Python 3.11", "0.17.1": "Python 3.12", "0.18.2": "Python 3.12"}


def supported_text() -> str:
    """One sentence naming the supported and the tested releases."""
    tested = ", ".join(f"{v} on {where}" for v, where in TESTED.items())
    by_hand = ", ".join(RUN_BY_HAND)
    return (f"nemo-checkpointless supports megatron-core {SUPPORTED[0]} to {SUPPORTED[-1]} "
            f"(0.17 and later need Python 3.12; CI runs {tested}; {by_hand} pass "
            f"make test-megatron)")


def installed_version() -> str:
    """The installed megatron-core version string ('' when megatron-core is missing)."""
    try:
        from importlib.metadata import version

        return version("megatron-core")
    except Exception:  # noqa: BLE001 - a source checkout without metadata
        try:
            from megatron.core import package_info

            return str(package_info.__version__)
        except Exception:  # noqa: BLE001
            return ""


class DatasetTokenizerBase(ABC):
    """What megatron-core's datasets need from a tokenizer, for releases without
    ``megatron.core.datasets.megatron_tokenizer``.

    ``unique_identifiers`` is built as that module built it (the class name, the paths,
    then every option as a string), so a dataset's cache key does not change with the
    megatron-core release.
    """

    def __init__(self, *tokenizer_paths: str, **tokenizer_options: Any) -> None:
        self.unique_identifiers: OrderedDict[str, Any] = OrderedDict()
        self.unique_identifiers["class"] = type(self).__name__
        self.unique_identifiers["tokenizer_path"] = list(tokenizer_paths)
        for option, value in tokenizer_options.items():
            self.unique_identifiers[option] = str(value)
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)
        super().__init__()

    @abstractmethod
    def tokenize(self, text: str) -> Any: ...

    @property
    @abstractmethod
    def vocab(self) -> Any: ...

    @property
    @abstractmethod
    def inv_vocab(self) -> Any: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    def _absent(self, name: str) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no attribute {name!r}")

    # optional attributes: the datasets catch the error and fall back to their defaults
    cls = property(lambda self: self._absent("cls"))
    sep = property(lambda self: self._absent("sep"))
    pad = property(lambda self: self._absent("pad"))
    eod = property(lambda self: self._absent("eod"))
    bos = property(lambda self: self._absent("bos"))
    eos = property(lambda self: self._absent("eos"))
    mask = property(lambda self: self._absent("mask"))


def legacy_tokenizer_base() -> type:
    """The tokenizer base class megatron-core's datasets expect, on any supported release."""
    try:
        module = importlib.import_module("megatron.core.datasets.megatron_tokenizer")
    except ImportError:
        return DatasetTokenizerBase
    for name in ("MegatronLegacyTokenizer", "MegatronTokenizer"):
        base = getattr(module, name, None)
        if isinstance(base, type):
            return base
    return DatasetTokenizerBase


def dataset_cache_probe(dataset_cls: type, config: Any, *args: Any) -> tuple[Any, Optional[str]]:
    """``dataset_cls(*args, config)`` without its indices (see module doc): the probe (its
    ``unique_description_hash`` and ``index_split`` name the cache files) and the path
    megatron-core would load the document index from, or None where it does not say.
    ``config`` is the probe's own (it may be changed)."""
    if hasattr(config, "defer_npy_index_mmap"):
        config.defer_npy_index_mmap = True
        probe = dataset_cls(*args, config)
        return probe, getattr(probe, "path_to_document_index", "")
    probe = dataset_cls.__new__(dataset_cls)
    super(dataset_cls, probe).__init__(*args, config)  # the key only; no indices
    return probe, None


_COLLECTIVE_CACHES = ("_has_grad_norm_group_cache",)


def forget_collective_caches(optimizer: Any) -> int:
    """Drop the optimizer's cached collective answers (see module doc); returns how many."""
    dropped = 0
    for opt in [optimizer, *getattr(optimizer, "chained_optimizers", [])]:
        for name in _COLLECTIVE_CACHES:
            if getattr(opt, name, None) is not None:
                setattr(opt, name, None)
                dropped += 1
    return dropped


# ---------------------------------------------------------------------- start-up check
def _attr(module: str, *path: str) -> Callable[[], bool]:
    def probe() -> bool:
        obj: Any = importlib.import_module(module)
        for name in path:
            obj = getattr(obj, name)
        return True
    return probe


def _params(module: str, func: str, *names: str) -> Callable[[], bool]:
    def probe() -> bool:
        target = getattr(importlib.import_module(module), func)
        params = inspect.signature(target).parameters
        return all(n in params for n in names)
    return probe


# (what the package does with it, probe)
_PROBES: list[tuple[str, Callable[[], bool]]] = [
    ("parallel state with distributed-optimizer instances and optional gloo groups",
     _params("megatron.core.parallel_state", "initialize_model_parallel",
             "num_distributed_optimizer_instances", "create_gloo_process_groups")),
    ("the replica group of an optimizer shard",
     _attr("megatron.core.parallel_state", "get_inter_distributed_optimizer_instance_group")),
    ("the optimizer step split at the commit point",
     _attr("megatron.core.optimizer.optimizer", "MixedPrecisionOptimizer",
           "step_with_ready_grads")),
    ("the gradient preparation before the commit point",
     _attr("megatron.core.optimizer.optimizer", "MixedPrecisionOptimizer", "prepare_grads")),
    ("the distributed optimizer",
     _attr("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer")),
    ("the parameter all-gather after an update",
     _attr("megatron.core.distributed", "DistributedDataParallel", "start_param_sync")),
    ("the tensor-parallel RNG state (CPU rehearsal)",
     _attr("megatron.core.tensor_parallel.random", "_get_cuda_rng_state")),
]


def missing_surfaces() -> list[str]:
    """What the installed megatron-core lacks of the surfaces the package calls."""
    missing = []
    for what, probe in _PROBES:
        try:
            ok = probe()
        except (ImportError, AttributeError, TypeError, ValueError):
            ok = False
        if not ok:
            missing.append(what)
    return missing


def check_megatron_core() -> str:
    """Start-up check: the installed megatron-core has every surface the package calls.

    Returns the version. Raises RuntimeError naming what is missing and the supported
    versions; logs a warning for a release outside :data:`SUPPORTED` that passes the probes.
    """
    version = installed_version()
    if not version:
        raise RuntimeError(f"megatron-core is not installed: {supported_text()}")
    missing = missing_surfaces()
    if missing:
        raise RuntimeError(
            f"megatron-core {version} lacks what nemo-checkpointless needs ({'; '.join(missing)})."
            f" {supported_text()}: install one of them (pip install 'megatron-core>=0.15,<0.20').")
    series = ".".join(version.split(".")[:2])
    if series not in SUPPORTED:
        log.warning("megatron-core %s is outside the supported releases; the probes pass, but "
                    "it is untested. %s", version, supported_text())
    return version
