"""The messages between a node agent and its rank processes, as typed dataclasses.

They travel over the agent channel (``channel.py``) as one JSON object per line; ``t`` names
the kind. :func:`encode` and :func:`decode` are the only places that know the wire form.

rank -> agent
  ``Hello(recovery, progress)``  start-up went through; ``recovery``: the rank recovers in
      process (tier 3/4); ``progress``: it will report every step (``Step``), so the agent
      judges hangs by progress instead of by heartbeats (default: as ``recovery``, whose
      loop reports its steps).
  ``Heartbeat()``  from the rank's link thread, every 0.1 s: the process lives.
  ``Step(step)``  the training loop finished step ``step`` (sent by the loop itself).
  ``Pause(reason)``  the rank leaves the step loop for work of unknown length (validation,
      a synchronous checkpoint, the end of training): the initial timeout applies until its
      next step.
  ``Unwound(gen)``  the main thread reached recovery, or joined generation ``gen``: it
      is not stuck (its next step gets the initial timeout).
  ``Done()``  training finished; teardown may block.
  ``Fatal(reason)``  the job cannot recover (every rank reaches the same verdict): the agent
      stops the job and logs the reason.
  ``DeviceError(reason)``  the rank's CUDA context is poisoned; it exits with
      ``EXIT_DEVICE_ERROR``. The agent probes the GPU before it hands the rank on.
  ``Stopped(step)``  the rank stopped after step ``step`` because the job was asked to
      (every rank agreed on that step and a durable checkpoint of it is written); it exits
      with ``EXIT_STOPPED``.

agent -> rank
  ``Gen(gen)``  the job moved to generation ``gen`` (abort, re-form).
  ``Assign(rank, local_rank, gen, node_rank)``  a warm spare takes rank ``rank``
      (``node_rank``: set when a standby node's process takes a lost node's rank).
  ``Stop(reason)``  the job is asked to stop (a scheduler's SIGTERM, a time limit's
      SIGUSR1): finish the step every rank agrees on, checkpoint it, exit ``EXIT_STOPPED``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

# exit codes a rank uses to tell its agent something the exit status alone must carry
EXIT_UNRECOVERABLE = 3  # the job cannot recover: stop it (runtime.py)
EXIT_DEVICE_ERROR = 4  # this rank's CUDA context is poisoned: probe the GPU, then replace
# exit code of the agent itself when its node must be replaced (a GPU failed its probe)
EXIT_NODE_UNHEALTHY = 5
# a rank (and then its agent) that stopped because the job was asked to, after a final
# checkpoint: 128 + SIGTERM, which schedulers treat as a retryable stop, not a failure
EXIT_STOPPED = 143


class ProtocolError(ValueError):
    """A message the other side cannot have sent: unknown kind or missing fields."""


@dataclass(frozen=True)
class Hello:
    KIND: ClassVar[str] = "hello"
    recovery: bool
    progress: Optional[bool] = None  # None: as ``recovery`` (the recovery loop reports steps)

    @property
    def reports_progress(self) -> bool:
        return self.recovery if self.progress is None else self.progress


@dataclass(frozen=True)
class Heartbeat:
    KIND: ClassVar[str] = "hb"


@dataclass(frozen=True)
class Step:
    KIND: ClassVar[str] = "step"
    step: int


@dataclass(frozen=True)
class Pause:
    KIND: ClassVar[str] = "pause"
    reason: str = ""


@dataclass(frozen=True)
class Unwound:
    KIND: ClassVar[str] = "unwound"
    gen: int


@dataclass(frozen=True)
class Done:
    KIND: ClassVar[str] = "done"


@dataclass(frozen=True)
class Fatal:
    KIND: ClassVar[str] = "fatal"
    reason: str


@dataclass(frozen=True)
class DeviceError:
    KIND: ClassVar[str] = "device_error"
    reason: str


@dataclass(frozen=True)
class Stopped:
    KIND: ClassVar[str] = "stopped"
    step: int


@dataclass(frozen=True)
class Stop:
    KIND: ClassVar[str] = "stop"
    reason: str = ""


@dataclass(frozen=True)
class Gen:
    KIND: ClassVar[str] = "gen"
    gen: int


@dataclass(frozen=True)
class Assign:
    KIND: ClassVar[str] = "assign"
    rank: int
    local_rank: int
    gen: int
    node_rank: Optional[int] = None


Message = Union[Hello, Heartbeat, Step, Pause, Unwound, Done, Fatal, DeviceError, Stopped,
                Gen, Assign, Stop]
KINDS: dict[str, type] = {cls.KIND: cls for cls in (Hello, Heartbeat, Step, Pause, Unwound,
                                                   Done, Fatal, DeviceError, Stopped, Gen,
                                                   Assign, Stop)}
_TYPES = {"bool": bool, "int": int, "str": str, "Optional[int]": int, "Optional[bool]": bool}  # annotations are strings


def encode(message: Message) -> dict[str, Any]:
    """The wire form: ``{"t": kind, **fields}``."""
    if type(message) not in KINDS.values():
        raise ProtocolError(f"not a protocol message: {message!r}")
    return {"t": message.KIND, **dataclasses.asdict(message)}


def decode(obj: dict[str, Any]) -> Message:
    """A message from its wire form; unknown extra fields are ignored (newer senders)."""
    kind = obj.get("t")
    cls = KINDS.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind!r} in {obj!r}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in obj and obj[f.name] is not None:
            want = _TYPES.get(f.type, None)
            value = obj[f.name]
            if want is not None and not isinstance(value, want):
                try:
                    value = want(value)
                except (TypeError, ValueError):
                    raise ProtocolError(f"{kind}.{f.name}: bad value {value!r}") from None
            values[f.name] = value
        elif f.default is dataclasses.MISSING:
            raise ProtocolError(f"{kind} message without {f.name!r}: {obj!r}")
    return cls(**values)
