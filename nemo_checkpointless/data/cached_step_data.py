"""One loader per data coordinate, its TP peers reading the loader's files from shared memory.

:class:`CachedStepData` has the interface of ``train.data.StepData``
(``micro_batches(consumed_samples)``) and plays one of three roles:

* **loader** (the process holding ``loader.lock``, tp_rank 0 by preference): reads the
  dataset, publishes each step's micro-batches with :class:`ShmStepCache`, prefetches
  ``prefetch_steps`` ahead in a background thread and prunes files more than
  ``lookback_steps`` behind.
* **reader** (the other TP ranks): memory-maps the loader's file for the step. It waits
  at most ``read_timeout_s`` for it; then, if the loader is gone (its ``flock`` is free),
  it takes over the loader role, otherwise it loads that step itself and waits only
  ``DEGRADED_WAIT_S`` for later steps until a file arrives in time again. It never hangs.
* **direct**: the cache directory is unusable (unwritable, full); every step is loaded
  from the dataset, as without the cache.

Positions are a pure function of ``consumed_samples``, so a restarted or replacement
process reattaches in O(1): it opens the file of its step, no earlier batch is read.
A file that is stale (other job, config or coordinate) or corrupt is rejected with the
reason logged and rebuilt from the dataset. A write that fails (``ENOSPC``, ``EACCES``)
turns the cache off for this process with a warning, and a ``DISABLED`` marker tells the
readers to load directly instead of waiting.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Optional, Protocol

from .shm_cache import Batches, ShmStepCache, StaleOrCorrupt

log = logging.getLogger(__name__)

DEFAULT_READ_TIMEOUT_S = 30.0
"""How long a reader waits for the loader's file before it takes over or loads directly.
Set per run with ``$NCL_DATA_CACHE_TIMEOUT_S`` (or ``data_cache.read_timeout_s`` if the
config has it); it must cover the loader's start-up (building the dataset index)."""

_POLL_MIN_S = 0.0005
_POLL_MAX_S = 0.02
DEGRADED_WAIT_S = 0.5
"""A reader's wait after one timed out while the loader was alive (it is slow or cannot
write); back to ``read_timeout_s`` as soon as a file arrives in time."""


class StepSource(Protocol):
    """Where batches come from without the cache (``train.data.StepData``)."""

    def micro_batches(self, consumed_samples: int) -> Batches: ...


@dataclass
class CacheStats:
    """What this process did; ``samples_read`` counts samples read from the dataset."""

    samples_read: int = 0
    steps_from_cache: int = 0
    steps_loaded: int = 0
    files_written: int = 0
    files_rejected: int = 0
    waits_timed_out: int = 0
    takeovers: int = 0


class CachedStepData:
    """Micro-batches of one data coordinate, shared by its TP ranks through ``cache``.

    Args:
        source_factory: builds the direct loader; called lazily, only by a process that
            has to read the dataset (so readers never open it).
        cache: the coordinate's step files.
        global_batch_size: samples per step over all DP ranks (step = consumed // gbs).
        samples_per_step: samples this coordinate reads per step (gbs / dp), for stats.
        prefer_loader: try to take the loader role at start (tp_rank 0).
        prefetch_steps: steps the loader keeps published ahead of the current one.
        lookback_steps: steps kept behind the current one; older files are deleted.
        read_timeout_s: a reader's bounded wait for a file (see the module docstring).
        end_samples: no prefetch past the step whose batch ends here (max_steps * gbs).
    """

    def __init__(
        self,
        source_factory: Callable[[], StepSource],
        cache: ShmStepCache,
        *,
        global_batch_size: int,
        samples_per_step: int,
        prefer_loader: bool,
        prefetch_steps: int = 2,
        lookback_steps: int = 2,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        end_samples: Optional[int] = None,
    ) -> None:
        if prefetch_steps < 0 or lookback_steps < 0 or read_timeout_s < 0:
            raise ValueError(
                f"prefetch_steps={prefetch_steps}, lookback_steps={lookback_steps} and "
                f"read_timeout_s={read_timeout_s} must be non-negative"
            )
        self.cache = cache
        self.stats = CacheStats()
        self._factory = source_factory
        self._source: Optional[StepSource] = None
        self._gbs = global_batch_size
        self._per_step = samples_per_step
        self._prefetch = prefetch_steps
        self._lookback = lookback_steps
        self._timeout = read_timeout_s
        self._wait_s = read_timeout_s
        self._end = end_samples
        self._io = threading.RLock()  # the source and the counters
        self._cond = threading.Condition()
        self._target: Optional[int] = None
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._good: set[int] = set()  # steps whose file this process wrote or verified
        self._warned_unaligned = False
        self.role = "reader"
        try:
            cache.probe()
        except OSError as err:
            self.role = "direct"
            log.warning("data cache %s is not usable (%s); loading every step directly from "
                        "the dataset, training continues", cache.dir, err)
        if self.role == "reader" and prefer_loader and cache.try_lock():
            self.role = "loader"
            cache.clear_disabled()
        log.debug("data cache %s: role %s", cache.dir, self.role)
        atexit.register(self._report)

    # ------------------------------------------------------------------ interface
    def micro_batches(self, consumed_samples: int) -> Batches:
        """This coordinate's micro-batches of the global batch starting at ``consumed_samples``."""
        step, rest = divmod(consumed_samples, self._gbs)
        if rest:
            if not self._warned_unaligned:
                self._warned_unaligned = True
                log.warning("consumed_samples=%d is not a multiple of global_batch_size=%d; "
                            "loading directly", consumed_samples, self._gbs)
            return self._load(consumed_samples)
        if self.role == "direct":
            return self._load(consumed_samples)
        if self.role == "loader":
            return self._loader_step(step, consumed_samples)
        return self._reader_step(step, consumed_samples)

    def close(self) -> None:
        """Stop prefetching and give the loader role up (files stay for the peers)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.cache.unlock()
        atexit.unregister(self._report)

    # ------------------------------------------------------------------ loader
    def _loader_step(self, step: int, consumed: int) -> Batches:
        batches = self._current(step, consumed)
        self._advance(step)  # after: this step goes first, prefetching must not delay it
        return batches

    def _current(self, step: int, consumed: int) -> Batches:
        try:
            batches = self.cache.read(step, consumed)
            self.stats.steps_from_cache += 1
            return batches
        except FileNotFoundError:
            pass
        except StaleOrCorrupt as err:
            self._reject(step, err)
        with self._io:  # the prefetch thread may be writing this very step
            if step in self._good:
                try:
                    batches = self.cache.read(step, consumed)
                    self.stats.steps_from_cache += 1
                    return batches
                except (FileNotFoundError, StaleOrCorrupt):
                    self._good.discard(step)
            batches = self._load(consumed)
            self._publish(step, consumed, batches)
            return batches

    def _advance(self, step: int) -> None:
        with self._cond:
            self._target = step
            self._cond.notify_all()
        if self._thread is None and self.role == "loader":
            self._thread = threading.Thread(target=self._prefetch_loop, name="ncl-data-prefetch",
                                            daemon=True)
            self._thread.start()

    def _prefetch_loop(self) -> None:
        done: Optional[int] = None
        while True:
            with self._cond:
                while not self._stop and self._target == done:
                    self._cond.wait()
                if self._stop:
                    return
                current = done = self._target
            assert current is not None
            for ahead in range(current + 1, current + 1 + self._prefetch):
                if self._stop or self.role != "loader" or self._target != current:
                    break
                if self._end is not None and (ahead + 1) * self._gbs > self._end:
                    break
                try:
                    self._ensure_published(ahead)
                except Exception as err:  # noqa: BLE001 - prefetch is best effort
                    log.warning("data cache: prefetch of step %d failed (%s); the step will be "
                                "loaded when it is needed", ahead, err)
                    break
            self.cache.prune(keep_from=current - self._lookback)
            with self._io:
                self._good = {s for s in self._good if s >= current - self._lookback}

    def _ensure_published(self, step: int) -> None:
        consumed = step * self._gbs
        with self._io:
            if step in self._good or self.role != "loader":
                return
            try:
                self.cache.read(step, consumed)
                self._good.add(step)  # left by an earlier loader of this job: reattach
                return
            except FileNotFoundError:
                pass
            except StaleOrCorrupt as err:
                self._reject(step, err)
            self._publish(step, consumed, self._load(consumed))

    def _publish(self, step: int, consumed: int, batches: Batches) -> None:
        if self.role != "loader":
            return
        try:
            self.cache.write(step, consumed, batches)
        except OSError as err:
            self.role = "direct"
            self.cache.mark_disabled(f"{err}")
            log.warning("data cache: cannot write %s (%s); falling back to direct loading for "
                        "the rest of this run, training continues", self.cache.path(step), err)
            return
        self.stats.files_written += 1
        self._good.add(step)

    # ------------------------------------------------------------------ reader
    def _reader_step(self, step: int, consumed: int) -> Batches:
        deadline = time.monotonic() + self._wait_s
        delay = _POLL_MIN_S
        while True:
            try:
                batches = self.cache.read(step, consumed)
                self.stats.steps_from_cache += 1
                self._wait_s = self._timeout
                return batches
            except FileNotFoundError:
                pass
            except StaleOrCorrupt as err:
                self._reject(step, err)
                batches = self._load(consumed)
                try:  # rebuild it for the peers; harmless if the loader does too
                    self.cache.write(step, consumed, batches)
                    self.stats.files_written += 1
                except OSError as write_err:
                    log.warning("data cache: could not rewrite %s (%s)", self.cache.path(step),
                                write_err)
                return batches
            if self.cache.is_disabled():
                return self._load(consumed)
            if time.monotonic() >= deadline:
                break
            time.sleep(delay)
            delay = min(2 * delay, _POLL_MAX_S)
        self.stats.waits_timed_out += 1
        if self.cache.try_lock():
            self.role = "loader"
            self.stats.takeovers += 1
            log.warning("data cache: no file for step %d after %.1fs and the loader of %s is "
                        "gone; this rank takes over the loader role", step, self._timeout,
                        self.cache.coord.name)
            return self._loader_step(step, consumed)
        log.warning("data cache: no file for step %d after %.1fs although a loader is alive; "
                    "loading it directly", step, self._wait_s)
        self._wait_s = min(self._timeout, DEGRADED_WAIT_S)
        return self._load(consumed)

    # ------------------------------------------------------------------ shared
    def _reject(self, step: int, err: StaleOrCorrupt) -> None:
        self.stats.files_rejected += 1
        log.warning("data cache: rejected %s: %s; rebuilding it from the dataset",
                    self.cache.path(step), err)
        self._good.discard(step)

    def _load(self, consumed: int) -> Batches:
        with self._io:
            if self._source is None:
                self._source = self._factory()
            batches = self._source.micro_batches(consumed)
            self.stats.samples_read += self._per_step
            self.stats.steps_loaded += 1
            return batches

    def _report(self) -> None:
        log.info("data cache %s: role %s, %s", self.cache.coord.name, self.role,
                 " ".join(f"{k}={v}" for k, v in asdict(self.stats).items()))
