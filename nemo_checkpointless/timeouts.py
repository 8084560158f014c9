"""Every timeout of the package in one typed section, resolved once: flag > environment > default.

``ncl-launch`` resolves :class:`Timeouts` from its flags and its environment
(:meth:`Timeouts.resolve`) and exports the result into every child's environment
(:meth:`Timeouts.to_env`), so ``ncl-launch --store-timeout 30`` reaches the ranks; a rank
reads the same values back with :meth:`Timeouts.from_env`. A value that is not a positive
number of seconds is refused with the variable or flag that gave it.

A few defaults depend on where the job runs: the collective timeout and the abort grace on
the backend (gloo or NCCL), the hang timeouts on whether the host has a GPU (CPU rehearsal
steps take a fraction of a second; a GPU job's first steps can take minutes). Such fields
default to ``None`` and are read through :meth:`Timeouts.pg`, :meth:`Timeouts.abort_grace`,
:meth:`Timeouts.hang_min` and :meth:`Timeouts.hang_initial`.

The reference table in ``docs/launch.md`` ("Timeouts") is generated from the fields below:
``python -m nemo_checkpointless.timeouts --markdown`` (a unit test keeps the two equal).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from . import knobs


class TimeoutConfigError(ValueError):
    """A timeout given as something other than a positive number of seconds."""


def _knob(default: Optional[float], env: str, meaning: str, flag: Optional[str] = None,
          default_doc: Optional[str] = None, zero_ok: bool = False) -> Any:
    return knobs.knob(default, env, meaning, flag=flag, default_doc=default_doc,
                      zero_ok=zero_ok)


@dataclass(kw_only=True, frozen=True)
class Timeouts:
    """Seconds (floats) for everything the package waits on; see each field's meaning."""

    store_s: float = _knob(
        120.0, "NCL_STORE_TIMEOUT_S",
        "every store request and wait, and how long an unreachable store server is retried "
        "(start-up included: a big job's ranks arrive over a minute or more)",
        flag="--store-timeout")
    store_connect_s: float = _knob(
        2.0, "NCL_STORE_CONNECT_TIMEOUT_S",
        "one TCP connect attempt to a store server (a server that fails slowly is skipped "
        "for 1 s by replicated reads)")
    recovery_s: float = _knob(
        300.0, "NCL_RECOVERY_TIMEOUT_S",
        "after a failure: the wait for a new generation, and for every rank to arrive at it",
        flag="--recovery-timeout")
    pg_s: Optional[float] = _knob(
        None, "NCL_PG_TIMEOUT_S", "every collective (the world and megatron's groups)",
        flag="--pg-timeout", default_doc="60 gloo, 600 NCCL")
    hang_initial_s: Optional[float] = _knob(
        None, "NCL_HANG_INITIAL_TIMEOUT_S",
        "progress-based hang detection: from a rank's start (or a new generation, or a pause "
        "the rank announced) to its first step",
        flag="--hang-initial-timeout", default_doc="300 CPU, 600 GPU")
    hang_s: Optional[float] = _knob(
        None, "NCL_HANG_TIMEOUT_S",
        "the least time between two steps before a rank counts as hung (the steady timeout "
        "is the larger of this and `hang_factor` x the slowest recent step); ranks that do "
        "not report steps: the longest heartbeat silence",
        flag="--hang-timeout", default_doc="3 CPU, 60 GPU")
    hang_factor: float = _knob(
        5.0, "NCL_HANG_FACTOR",
        "multiplier (not seconds) on the slowest of the last 20 step times for the steady "
        "hang timeout", flag="--hang-factor")
    unwind_s: float = _knob(
        30.0, "NCL_UNWIND_TIMEOUT_S",
        "a rank that stalled while its process lives (a hang in a collective or on the GPU) "
        "gets its communicators aborted; if it has not unwound to recovery within this, it "
        "is killed and replaced", flag="--unwind-timeout")
    stuck_after_s: float = _knob(
        20.0, "NCL_STUCK_AFTER_S",
        "rank side: the main thread has not unwound this long after an abort: abort again "
        "and log its stacks")
    failure_confirm_s: float = _knob(
        30.0, "NCL_FAILURE_CONFIRM_S",
        "rank side: an error of no known kind (gloo reports a dead peer as a plain "
        "RuntimeError) is recovered if the job announces a new generation within this; "
        "otherwise it is a bug of this rank and the rank exits")
    abort_grace_s: Optional[float] = _knob(
        None, "NCL_ABORT_GRACE_S",
        "rank side: between a generation notice and the abort of the rank's communicators "
        "(gloo: lets operations between healthy ranks finish)",
        default_doc="1 gloo, 0 NCCL", zero_ok=True)
    node_lost_after_s: float = _knob(
        1.0, "NCL_NODE_LOST_AFTER_S",
        "a node's store server unreachable this long: its node is declared lost (by every "
        "other agent, and taken over by a standby)", flag="--lost-after")
    spare_refill_delay_s: float = _knob(
        5.0, "NCL_SPARE_REFILL_DELAY_S",
        "after a warm spare took a rank, before a new spare is started (its start-up would "
        "compete with the recovery)", flag="--spare-refill-delay", zero_ok=True)
    data_cache_read_s: float = _knob(
        30.0, "NCL_DATA_CACHE_TIMEOUT_S",
        "a TP reader's wait for its loader's cached batch "
        "(`checkpointless.data_cache.read_timeout_s` overrides it)")
    gpu_probe_s: float = _knob(
        120.0, "NCL_GPU_PROBE_TIMEOUT_S",
        "the GPU health probe run before a device error's local rank goes to a spare "
        "(CUDA start-up included); a probe that takes longer fails",
        flag="--gpu-probe-timeout")

    # ------------------------------------------------------------------ resolution
    @classmethod
    def resolve(cls, flags: Optional[Mapping[str, Any]] = None,
                env: Mapping[str, str] = os.environ) -> "Timeouts":
        """Each field from ``flags`` (field name -> value; None: not given), else from its
        environment variable, else its default."""
        return knobs.resolve(cls, lambda value, source, f: _seconds(value, source,
                                                                     f.metadata["zero_ok"]),
                             "timeouts", flags, env)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Timeouts":
        """What a rank reads: the values its agent exported (or the defaults)."""
        return cls.resolve(env=env)

    def to_env(self) -> dict[str, str]:
        """Every field that has a value, as the environment variables ranks read."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.metadata["env"]] = repr(float(value))
        return out

    # ------------------------------------------------------------------ context defaults
    def pg(self, backend: str) -> datetime.timedelta:
        """The collective timeout for ``backend``."""
        seconds = self.pg_s if self.pg_s is not None else (600.0 if backend == "nccl"
                                                            else 60.0)
        return datetime.timedelta(seconds=seconds)

    def abort_grace(self, backend: str) -> float:
        if self.abort_grace_s is not None:
            return self.abort_grace_s
        return 1.0 if backend == "gloo" else 0.0

    def hang_min(self, gpu: bool) -> float:
        if self.hang_s is not None:
            return self.hang_s
        return 60.0 if gpu else 3.0

    def hang_initial(self, gpu: bool) -> float:
        if self.hang_initial_s is not None:
            return self.hang_initial_s
        return 600.0 if gpu else 300.0

    def delta(self, name: str) -> datetime.timedelta:
        """A field that has a value, as a ``timedelta``."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"timeouts.{name} depends on the backend or host: use its accessor")
        return datetime.timedelta(seconds=value)


def _seconds(value: Any, source: str, zero_ok: bool) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise TimeoutConfigError(f"{source}={value!r} is not a number of seconds; give e.g. "
                            f"{source}=30") from None
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero_ok):
        need = "zero or more" if zero_ok else "more than zero"
        raise TimeoutConfigError(f"{source}={value!r}: a timeout must be {need} seconds")
    return seconds


def render_markdown() -> str:
    """The reference table (field, flag, environment variable, default, meaning)."""
    return knobs.render_markdown(Timeouts, default_header="default (s)")


def main(argv: Optional[list[str]] = None) -> int:
    return knobs.markdown_main("nemo_checkpointless.timeouts", render_markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
