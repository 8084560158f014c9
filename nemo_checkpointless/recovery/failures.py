"""What kind of failure an exception on the training path is: recoverable, or fatal.

Classification is by type, and, for errors whose type says nothing (gloo reports a dead
peer as a plain ``RuntimeError``), by what the job itself says: the node agents announce a
new generation whenever a rank or node is lost, so an error followed by such an
announcement within ``confirm_timeout`` is a symptom of that failure and is recovered; an
error the job does not confirm (a bug in this rank's code) is fatal and is raised.

* fatal by type: :class:`Fatal` subclasses (no peer holds lost state, a NaN loss, a
  corrupted transfer, an injected ``exception`` fault), :class:`RendezvousTimeout`;
* recoverable by type: a newer generation already announced, :class:`GenerationChanged`,
  :class:`CommunicationFailure` (this package's own, e.g. an incomplete commit barrier),
  ``torch.distributed.DistError`` (NCCL and the c10d store raise its subclasses);
* anything else: recoverable if the agent announces a new generation within
  ``confirm_timeout``, fatal otherwise.
"""

from __future__ import annotations

import enum
import logging
from typing import Callable, Optional

import torch.distributed as dist

from ..steps import Stopped

log = logging.getLogger(__name__)


class CommunicationFailure(RuntimeError):
    """A collective or the control plane failed because of a failure elsewhere in the job."""


class Fatal(RuntimeError):
    """A failure every rank reaches the same verdict on: the job stops (exit code 3)."""


class Verdict(enum.Enum):
    RECOVERABLE = "recoverable"
    FATAL = "fatal"


def _fatal_types() -> tuple[type, ...]:
    from ..comm.rendezvous import RendezvousTimeout
    from ..metrics.progress import NonFiniteLoss
    from ..replication.replica_map import UnrecoverableError
    from ..replication.transfer import TransferError
    from .faults import InjectedFault

    return (Fatal, Stopped, UnrecoverableError, NonFiniteLoss, TransferError, InjectedFault,
            RendezvousTimeout)


def _recoverable_types() -> tuple[type, ...]:
    from ..comm.rendezvous import GenerationChanged

    return (GenerationChanged, CommunicationFailure, getattr(dist, "DistError", ()))


def classify(err: BaseException, *, superseded: Callable[[], bool],
             confirmed_within: Optional[Callable[[float], bool]] = None,
             confirm_timeout: float = 0.0) -> Verdict:
    """Decide whether ``err`` is recovered in process.

    ``superseded()``: a newer generation than the active one is known now.
    ``confirmed_within(seconds)``: wait up to that long for the job to announce one.
    """
    if isinstance(err, _fatal_types()) or not isinstance(err, Exception):
        return Verdict.FATAL  # KeyboardInterrupt, SystemExit: never swallowed
    if superseded() or isinstance(err, _recoverable_types()):
        return Verdict.RECOVERABLE
    if confirmed_within is not None and confirm_timeout > 0:
        log.warning("%s: %s; waiting up to %.0fs for the job to report a failure elsewhere",
                    type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "",
                    confirm_timeout)
        if confirmed_within(confirm_timeout):
            return Verdict.RECOVERABLE
    return Verdict.FATAL
