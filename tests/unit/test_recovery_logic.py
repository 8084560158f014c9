"""Pure logic of recovery: commit agreement, replica map, fault plans, transfer packing."""

from __future__ import annotations

import pytest
import torch

from nemo_checkpointless.recovery.faults import FaultInjector, Fault, fail_at, parse_plan
from nemo_checkpointless.replication.replica_map import (RankInfo, UnrecoverableError, agree,
                                                         donors_for, unprotected_ranks)
from nemo_checkpointless.replication.transfer import ByteLayout, checksum, messages, stripes
from nemo_checkpointless.steps import Phase


def info(rank, has_state=True, applied=4, entered=4, passed=4, tp=0, pp=0, shard=0):
    return RankInfo(rank, has_state, applied, entered, passed, tp, pp, shard)


def test_nobody_passed_the_barrier_means_redo():
    infos = [info(0, applied=4, entered=5, passed=4), info(1, applied=4, entered=4, passed=4),
             info(2, has_state=False, applied=0, entered=0, passed=0)]
    a = agree(infos)
    assert a.committed_step == 4 and a.roll_forward == ()


def test_someone_passed_the_barrier_means_roll_forward():
    infos = [info(0, applied=5, entered=5, passed=5), info(1, applied=4, entered=5, passed=4),
             info(2, applied=4, entered=5, passed=5)]
    a = agree(infos)
    assert a.committed_step == 5 and a.roll_forward == (1, 2)


def test_inconsistent_state_is_refused_not_hidden():
    with pytest.raises(UnrecoverableError):
        agree([info(0, applied=5, entered=5, passed=5), info(1, applied=3, entered=3, passed=3)])


def test_replica_map():
    # DP=4 with 2 optimizer instances: shards 0,1 in each instance; rank 3 lost
    infos = [info(0, shard=0), info(1, shard=1), info(2, shard=0),
             info(3, has_state=False, shard=1)]
    assert donors_for(infos, 3) == [1]
    assert unprotected_ranks(infos) == []
    one_instance = [info(r, shard=r) for r in range(4)]
    assert unprotected_ranks(one_instance) == [0, 1, 2, 3]


def test_rank_info_round_trip():
    i = info(3, has_state=False, applied=7, entered=8, passed=7, tp=1, pp=2, shard=5)
    assert RankInfo.from_tensor(i.to_tensor()) == i


def test_fault_plan_validation_messages():
    plan = [{"rank": 3, "step": 7, "phase": "optimizer", "kind": "kill"}]
    assert parse_plan(plan, 4, 10) == [Fault(3, 7, "optimizer", "kill")]
    with pytest.raises(ValueError, match="rank 4 does not exist"):
        parse_plan([dict(plan[0], rank=4)], 4, 10)
    with pytest.raises(ValueError, match="step 11 is outside 1..10"):
        parse_plan([dict(plan[0], step=11)], 4, 10)
    with pytest.raises(ValueError, match="kind 'melt' does not exist"):
        parse_plan([dict(plan[0], kind="melt")], 4, 10)
    with pytest.raises(ValueError, match="lacks phase"):
        parse_plan([{"rank": 0, "step": 1, "kind": "kill"}], 4, 10)
    assert fail_at(1, 2, "data", "exception") == {"rank": 1, "step": 2, "phase": "data",
                                                  "kind": "exception"}


def test_fault_fires_once_even_when_the_step_is_redone():
    from nemo_checkpointless.recovery.faults import InjectedFault

    inj = FaultInjector([Fault(0, 2, "forward", "exception")], rank=0)
    inj.on_phase(Phase.FORWARD, 1)
    with pytest.raises(InjectedFault):
        inj.on_phase(Phase.FORWARD, 2)
    inj.on_phase(Phase.FORWARD, 2)  # the redo of step 2 does not fail again


def test_byte_layout_is_zero_copy_for_flat_state_and_copies_across_runs():
    flat = torch.arange(12, dtype=torch.float32)
    views = [flat[0:5], flat[5:12]]                   # neighbours in memory: one run
    lone = torch.tensor([7.0, 8.0])                   # a separate allocation
    layout = ByteLayout([*views, lone])
    assert layout.total == 14 * 4 and len(layout.runs) == 2
    inside = layout.view(4, 40)
    assert inside is not None and inside.data_ptr() == flat.data_ptr() + 4   # no copy
    assert layout.view(40, 52) is None                 # spans both runs: copied
    data = layout.gather(40, 56)
    assert data.numel() == 16
    other = [torch.zeros(5), torch.zeros(7), torch.zeros(2)]
    target = ByteLayout(other)
    for a in range(0, layout.total, 8):                # any message cut works on both sides
        target.scatter(a, layout.gather(a, min(layout.total, a + 8)))
    assert torch.equal(torch.cat(other), torch.cat([flat, lone]))


def test_messages_stripe_over_donors_and_chunk():
    msgs = messages(100, [3, 7])
    assert msgs == [(3, 0, 48), (7, 48, 100)]          # stripes cut on 8-byte multiples
    assert stripes(100, 3) == [(0, 32), (32, 64), (64, 100)]
    assert stripes(10, 1) == [(0, 10)]


def test_checksum_depends_on_bytes_only_and_catches_corruption():
    size = 3 * 4096 + 1000                              # three 4 KB rows and a short one
    data = torch.randint(0, 256, (size + 3,), dtype=torch.uint8)
    ref = checksum(data[:size])
    shifted = torch.zeros(size + 4, dtype=torch.uint8)
    shifted[3:3 + size] = data[:size]                   # same bytes, unaligned address
    assert torch.equal(checksum(shifted[3:3 + size]), ref)
    assert torch.equal(checksum(data), checksum(data.clone()))   # odd length: padded word
    for corrupt in (lambda b: b.__setitem__(100, b[100] ^ 1),          # one bit
                    lambda b: b.__setitem__(size - 1, b[size - 1] ^ 128),  # in the short row
                    lambda b: b.__setitem__(slice(1024, 2048), 0),     # a zeroed range
                    lambda b: b.__setitem__(slice(4096, size), 0),     # truncated
                    lambda b: b.copy_(torch.cat((b[4096:], b[:4096])))):  # rows rotated
        bad = data[:size].clone()
        corrupt(bad)
        assert not torch.equal(checksum(bad), ref)
    for a, b in ((0, 8), (16, 4096 + 16), (8, 3 * 4096 + 8)):  # two words swapped
        if torch.equal(data[a:a + 8], data[b:b + 8]):
            continue
        swapped = data[:size].clone()
        swapped[a:a + 8], swapped[b:b + 8] = data[b:b + 8].clone(), data[a:a + 8].clone()
        if a // 4096 != b // 4096:  # the documented limit: order inside one 4 KB row
            assert not torch.equal(checksum(swapped), ref), (a, b)
        else:
            assert torch.equal(checksum(swapped), ref)
