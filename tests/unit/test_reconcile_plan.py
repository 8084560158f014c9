"""Where a recovery continues from, decided from every rank's report (pure logic)."""

from __future__ import annotations

import pytest

from nemo_checkpointless.recovery.reconcile import plan_recovery
from nemo_checkpointless.replication.replica_map import RankInfo, UnrecoverableError


def info(rank, has_state=True, applied=5, entered=5, passed=5, tp=0, pp=0, shard=None):
    return RankInfo(rank=rank, has_state=has_state, applied_step=applied, entered_step=entered,
                    passed_step=passed, tp=tp, pp=pp, shard=rank % 2 if shard is None else shard)


def test_a_lost_rank_gets_its_replicas_as_donors():
    infos = [info(0), info(1, has_state=False, applied=0, entered=0, passed=0), info(2), info(3)]
    plan = plan_recovery(infos, disk_source=False, disk_fallback=False, recovering=True)
    assert plan.source == "peers" and plan.committed_step == 5
    assert plan.transfers == {1: [3]} and plan.roll_forward == ()


def test_ranks_that_entered_a_step_someone_passed_roll_forward():
    infos = [info(0, applied=6, entered=6, passed=6), info(1, applied=5, entered=6, passed=5),
             info(2, applied=5, entered=6, passed=6), info(3, applied=6, entered=6, passed=6)]
    plan = plan_recovery(infos, disk_source=False, disk_fallback=False, recovering=True)
    assert plan.committed_step == 6 and plan.roll_forward == (1, 2)


def test_nobody_passed_means_everyone_redoes_the_step():
    infos = [info(r, applied=5, entered=6, passed=5) for r in range(4)]
    plan = plan_recovery(infos, disk_source=False, disk_fallback=False, recovering=True)
    assert plan.committed_step == 5 and plan.roll_forward == ()


def test_a_shard_nobody_holds_is_fatal_without_disk_and_goes_to_disk_with_it():
    infos = [info(0, has_state=False, applied=0, entered=0, passed=0), info(1),
             info(2, has_state=False, applied=0, entered=0, passed=0), info(3)]
    with pytest.raises(UnrecoverableError, match="no healthy rank holds a replica"):
        plan_recovery(infos, disk_source=False, disk_fallback=False, recovering=True)
    plan = plan_recovery(infos, disk_source=False, disk_fallback=True, recovering=True)
    assert plan.source == "disk" and plan.orphans == (0, 2)


def test_tier3_always_rolls_back_and_a_fresh_job_does_not():
    infos = [info(r) for r in range(4)]
    assert plan_recovery(infos, disk_source=True, disk_fallback=True,
                         recovering=True).source == "disk"
    assert plan_recovery(infos, disk_source=True, disk_fallback=True,
                         recovering=False).source == "peers"


def test_every_rank_lost_is_fatal():
    infos = [info(r, has_state=False) for r in range(2)]
    with pytest.raises(UnrecoverableError, match="every rank lost its state"):
        plan_recovery(infos, disk_source=False, disk_fallback=False, recovering=True)
