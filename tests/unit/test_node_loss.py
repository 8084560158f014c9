"""One loss, one generation: a standby's takeover and the peer watches of the other agents
see the same server go, a moment apart, and only one of them announces it.

The CI flake this pins down (test-nemo, 2026-12-03): a standby took node 1 over at
generation 3, and 30 ms later agent 0's peer watch declared the same node lost at
generation 4; the survivor was forming generation 3's world when generation 4 came.
Real store servers and clients, the launcher's own functions."""

from __future__ import annotations

import datetime

import pytest

from nemo_checkpointless.comm.store import JobIdentity, StoreServer, connect
from nemo_checkpointless.launch.generations import (current_generation, declare_lost,
                                                     mark_lost, read_record)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def job():
    return JobIdentity.generate("job-loss")


@pytest.fixture
def servers(job):
    started = [StoreServer("127.0.0.1", 0, job).start() for _ in range(3)]
    yield started
    for s in started:
        s.stop()


@pytest.fixture
def store(job, servers):
    client = connect([s.endpoint for s in servers], job, datetime.timedelta(seconds=3))
    client.set("node/1/owner", "agent:node1")
    return client


def test_agents_that_see_one_node_go_declare_it_once(store, servers):
    before = current_generation(store)
    first = declare_lost(store, 1, [1], "agent:node0", "gone",
                         unreachable=servers[1].endpoint)
    again = declare_lost(store, 1, [1], "agent:node2", "gone",
                         unreachable=servers[1].endpoint)
    assert first == before + 1 and again is None
    assert read_record(store, first)["lost_owner"] == "agent:node1"


def test_a_takeover_claims_the_loss_before_a_peer_watch_reads_the_old_owner(store, servers):
    """The standby marks the old incarnation lost first: a peer watch that read the old
    owner (and the old address) just before announces nothing."""
    assert mark_lost(store, 1, "agent:node1")  # standby.take_over, before its address
    before = current_generation(store)
    assert declare_lost(store, 1, [1], "agent:node0", "gone",
                        unreachable=servers[1].endpoint) is None
    assert current_generation(store) == before


def test_a_peer_watch_does_not_declare_the_standby_that_replaced_the_node(store, servers, job):
    """Read after the takeover published its address and owner, the node is not the one
    found down: no declaration names the standby's new incarnation."""
    old = servers[1].endpoint
    moved = StoreServer("127.0.0.2", 0, job).start()
    try:
        mark_lost(store, 1, "agent:node1")
        store.publish_endpoint(1, moved.endpoint)
        store.set("node/1/owner", "agent:standby")
        before = current_generation(store)
        assert declare_lost(store, 1, [1], "agent:node0", "gone", unreachable=old) is None
        assert current_generation(store) == before
        # the standby's node, found down at its own address later, is declared once
        assert declare_lost(store, 1, [1], "agent:node0", "gone",
                            unreachable=moved.endpoint) == before + 1
    finally:
        moved.stop()
