"""Failure classification: by type, and for untyped errors by the job's own confirmation."""

from __future__ import annotations

import torch.distributed as dist

from nemo_checkpointless.comm.rendezvous import GenerationChanged, RendezvousTimeout
from nemo_checkpointless.metrics.progress import NonFiniteLoss
from nemo_checkpointless.recovery.commit import BarrierFailed
from nemo_checkpointless.recovery.failures import Verdict, classify
from nemo_checkpointless.recovery.faults import InjectedFault
from nemo_checkpointless.replication.replica_map import UnrecoverableError
from nemo_checkpointless.replication.transfer import TransferError

GLOO_DEAD_PEER = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer")


def verdict(err, superseded=False, confirmed=False):
    waited = []

    def confirm(seconds):
        waited.append(seconds)
        return confirmed

    v = classify(err, superseded=lambda: superseded, confirmed_within=confirm,
                 confirm_timeout=7.0)
    return v, waited


def test_fatal_types_are_fatal_even_when_the_job_moved_on():
    for err in (UnrecoverableError("x"), NonFiniteLoss("nan"), TransferError("sum"),
                InjectedFault("boom"), RendezvousTimeout("late"), KeyboardInterrupt()):
        assert verdict(err, superseded=True)[0] is Verdict.FATAL


def test_typed_communication_failures_recover_without_waiting():
    for err in (GenerationChanged("g"), BarrierFailed("1 of 2"), dist.DistBackendError("nccl")):
        v, waited = verdict(err)
        assert v is Verdict.RECOVERABLE and waited == []


def test_an_untyped_error_recovers_only_if_the_job_confirms_a_failure():
    assert verdict(GLOO_DEAD_PEER, confirmed=True) == (Verdict.RECOVERABLE, [7.0])
    assert verdict(GLOO_DEAD_PEER, confirmed=False) == (Verdict.FATAL, [7.0])
    # the agent already announced a new generation: no wait
    assert verdict(ValueError("shape"), superseded=True) == (Verdict.RECOVERABLE, [])
    # a bug in this rank's code that nobody else sees stays fatal
    assert verdict(ValueError("shape"))[0] is Verdict.FATAL
