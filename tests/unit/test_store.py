"""The rootless store: routing, replicated generation, stale keys, admission, timeouts, counts.

Servers run in threads of the test process on free ports; no process group is created.
"""

from __future__ import annotations

import datetime
import socket
import struct
import threading
import time
import zlib

import pytest
import torch.distributed as dist

from nemo_checkpointless.comm import wire
from nemo_checkpointless.comm.init import LaunchEnv, expand_hostlist, plan_store
from nemo_checkpointless.comm.store import (AdmissionError, JobIdentity, StoreError, StoreServer,
                                            connect, parse_endpoints)
from nemo_checkpointless.comm.world import free_port

pytestmark = pytest.mark.timeout(60)
SECONDS = datetime.timedelta(seconds=1)


@pytest.fixture
def job():
    return JobIdentity.generate("job-a")


@pytest.fixture
def servers(job):
    started = [StoreServer("127.0.0.1", 0, job).start() for _ in range(4)]
    yield started
    for s in started:
        s.stop()


def eps(servers):
    return [s.endpoint for s in servers]


def _one_rank_world_reduces() -> None:
    """The one-rank world just formed works (an all-reduce); then it is destroyed."""
    import torch

    try:
        x = torch.ones(2)
        dist.all_reduce(x)
        assert x.tolist() == [1.0, 1.0]
    finally:
        dist.destroy_process_group()


def test_keys_route_by_stable_hash_and_spread_over_servers(job, servers):
    a = connect(eps(servers), job, 5 * SECONDS)
    for i in range(800):
        a.set(f"pg/0/k{i}", str(i))
    assert a.shard("pg/0/k7") == zlib.crc32(b"pg/0/k7") % 4
    b = connect(eps(servers), job, 5 * SECONDS)  # another client, same order: same routing
    assert [b.get(f"pg/0/k{i}") for i in range(0, 800, 97)] == [
        str(i).encode() for i in range(0, 800, 97)]
    totals = [s.op_counts()["total"] for s in servers]
    assert sum(totals) == 800 + 9
    assert all(0.15 < t / sum(totals) < 0.35 for t in totals), totals
    assert a.op_counts() == {f"127.0.0.1:{s.port}": s.op_counts()["set"] for s in servers}


def test_torch_store_semantics_match_tcpstore(job, servers):
    ours = connect(eps(servers), job, 5 * SECONDS)
    tcp = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                        timeout=5 * SECONDS)
    writers = {id(ours): connect(eps(servers), job, 5 * SECONDS),
               id(tcp): dist.TCPStore("127.0.0.1", tcp.port, is_master=False,
                                      timeout=5 * SECONDS)}
    for store in (ours, tcp):
        store.set("a", "1")
        assert store.add("n", 5) == 5 and store.add("n", -2) == 3
        assert store.get("n") == b"3"
        assert store.compare_set("c", "", "x") == b"x"
        assert store.compare_set("c", "y", "z") == b"x"
        assert store.compare_set("c", "x", "z") == b"z"
        assert store.compare_set("missing", "e", "d") == b"e"
        assert store.check(["a", "n"]) and not store.check(["a", "nope"])
        assert store.delete_key("a") and not store.check(["a"])
        threading.Timer(0.2, writers[id(store)].set, ("late", "v")).start()
        assert store.get("late") == b"v"  # get blocks until the key is set
        with pytest.raises(Exception):
            store.wait(["never"], datetime.timedelta(seconds=0.2))
    prefixed = dist.PrefixStore("p", ours)
    prefixed.set("k", b"\x00\xff")
    assert ours.get("p/k") == b"\x00\xff"


def test_generation_survives_losing_any_server(job, servers):
    store = connect(eps(servers), job, 3 * SECONDS)
    assert store.add("gen", 1) == 1 and store.add("gen", 1) == 2
    store.set("gen/2", '{"reason": "test"}')
    for lost in range(4):
        port = servers[lost].port
        servers[lost].stop()
        assert int(store.get("gen")) == 2 + lost
        assert store.get("gen/2") == b'{"reason": "test"}'
        assert store.add("gen", 1) == 3 + lost  # bumps while a server is gone
        servers[lost] = StoreServer("127.0.0.1", port, job).start()  # node replaced
        assert int(store.get("gen")) == 3 + lost  # read repair reaches the replacement
        only_new = connect([servers[lost].endpoint], job, SECONDS)
        assert int(only_new.get("gen")) == 3 + lost
        assert only_new.get("gen/2") == b'{"reason": "test"}'
    store.set("gen", "1")  # an older value never wins over a newer copy elsewhere
    assert int(connect(eps(servers), job, SECONDS).add("gen", 0)) >= 1
    with pytest.raises(StoreError, match="replicated"):
        store.compare_set("gen", "6", "7")


def test_replicated_wait_wakes_when_another_agent_writes(job, servers):
    a, b = connect(eps(servers), job, 5 * SECONDS), connect(eps(servers), job, 5 * SECONDS)
    threading.Timer(0.3, lambda: b.set("gen/1", "record")).start()
    t0 = time.monotonic()
    a.wait(["gen/1"], datetime.timedelta(seconds=3))
    assert time.monotonic() - t0 < 2.0 and a.get("gen/1") == b"record"
    with pytest.raises(StoreError, match="timeout"):
        a.wait(["gen/9"], datetime.timedelta(seconds=0.3))


def test_a_stale_generation_is_never_read(job, servers):
    store = connect(eps(servers), job, 5 * SECONDS)
    old, new = dist.PrefixStore("pg/1", store), dist.PrefixStore("pg/2", store)
    old.set("0/cpu/0/0", "address of a dead rank")
    with pytest.raises(Exception):
        new.wait(["0/cpu/0/0"], datetime.timedelta(seconds=0.2))
    new.set("0/cpu/0/0", "fresh")
    assert new.get("0/cpu/0/0") == b"fresh"
    assert store.delete_prefix("pg/1/") == 1 and not store.check(["pg/1/0/cpu/0/0"])


def test_wrong_job_id_or_secret_is_refused_and_touches_nothing(job, servers):
    store = connect(eps(servers), job, 2 * SECONDS)
    store.set("secret-plan", "a")
    wrong_secret = connect(eps(servers), JobIdentity(job.job_id, "not-the-secret"), 2 * SECONDS)
    wrong_job = connect(eps(servers), JobIdentity("job-b", job.secret), 2 * SECONDS)
    with pytest.raises(AdmissionError, match="wrong secret for job 'job-a'"):
        wrong_secret.get("secret-plan")
    with pytest.raises(AdmissionError, match="serves job 'job-a', not 'job-b'"):
        wrong_job.set("secret-plan", "b")
    with pytest.raises(AdmissionError):
        wrong_secret.add("gen", 1)
    assert store.get("secret-plan") == b"a" and store.add("gen", 0) == 0
    # a stray process speaking the protocol without proving anything
    host, port = servers[store.shard("secret-plan")].endpoint
    with socket.create_connection((host, port), timeout=2) as raw:
        raw.recv(64)  # greeting
        payload = wire.blobs(b"secret-plan", b"stray")
        raw.sendall(wire.HDR.pack(wire.SET, len(payload)) + payload)
        status, n = wire.HDR.unpack(raw.recv(5))
        assert status == wire.ERROR and b"not authenticated" in raw.recv(n)
    assert store.get("secret-plan") == b"a"
    assert sum(s.op_counts().get("refused", 0) for s in servers) >= 4


def test_a_second_job_on_the_same_ports_cannot_join_either_way(job, servers):
    ours = connect(eps(servers), job, 2 * SECONDS)
    ours.set("k", "ours")
    other = JobIdentity.generate("job-b")
    # job B's ranks pointed at job A's ports are refused
    with pytest.raises(AdmissionError):
        connect(eps(servers), other, 2 * SECONDS).get("k")
    # job A's server dies and job B's server takes its port: it refuses job A's clients
    lost = ours.shard("k")
    port = servers[lost].port
    servers[lost].stop()
    intruder = StoreServer("127.0.0.1", port, other).start()
    try:
        with pytest.raises(AdmissionError, match="serves job 'job-b', not 'job-a'"):
            ours.set("k", "ours again")
        assert intruder.op_counts().get("set", 0) == 0
    finally:
        intruder.stop()
    # a server that accepts anyone cannot prove job A's secret: job A's clients refuse it
    impostor = socket.create_server(("127.0.0.1", port))
    threading.Thread(target=_accept_anyone, args=(impostor,), daemon=True).start()
    try:
        with pytest.raises(AdmissionError, match="another job's server holds this port"):
            ours.set("k", "ours again")
    finally:
        impostor.close()
    servers[lost] = StoreServer("127.0.0.1", port, job).start()


def _accept_anyone(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    greeting = wire.MAGIC + b"n" * 16
    conn.sendall(wire.HDR.pack(wire.OK, len(greeting)) + greeting)
    conn.recv(4096)
    conn.sendall(wire.HDR.pack(wire.OK, 32) + b"\0" * 32)  # "welcome", with no valid proof
    conn.recv(4096)


def test_an_unreachable_peer_fails_clearly_within_the_timeout(job, servers):
    dead = ("127.0.0.1", free_port())
    store = connect([*eps(servers[:2]), dead], job, datetime.timedelta(seconds=1.5))
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=f"1 of 3 store servers unreachable.*{dead[1]}"):
        store.ping_all()
    assert time.monotonic() - t0 < 3.0
    key = next(f"k{i}" for i in range(100) if store.shard(f"k{i}") == 2)
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=f"127.0.0.1:{dead[1]}.*unreachable"):
        store.set(key, "v")
    assert time.monotonic() - t0 < 3.0
    store.set(next(f"k{i}" for i in range(100) if store.shard(f"k{i}") == 0), "v")  # others work


def test_a_replaced_server_is_reconnected_lazily(job, servers):
    store = connect(eps(servers), job, 5 * SECONDS)
    key = "rdzv/0/arrived"
    store.add(key, 3)
    i = store.shard(key)
    port = servers[i].port
    servers[i].stop()
    servers[i] = StoreServer("127.0.0.1", port, job).start()
    assert store.add(key, 1) == 1  # the key went with the old server; the client carries on


def test_gloo_rendezvous_through_the_store_counts_few_operations(job, servers):
    store = connect(eps(servers), job, 5 * SECONDS)
    with store.rendezvous_hint(1):
        dist.init_process_group("gloo", store=dist.PrefixStore("pg/0", store), rank=0,
                                world_size=1)
    _one_rank_world_reduces()
    counts = [s.op_counts() for s in servers]
    assert sum(c.get("total", 0) for c in counts) == 2  # one set + one batched wait


def test_planning_from_launcher_environments():
    le = LaunchEnv.from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                             "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "h0", "MASTER_PORT": "500"})
    assert (le.node_rank, le.nnodes) == (1, 2)
    plan = plan_store(le, {"NCL_STORE_ENDPOINTS": "a:1,b:2"})
    assert plan.endpoints == [("a", 1), ("b", 2)] and plan.serve == []
    assert expand_hostlist("gpu[01-03,7],login") == ["gpu01", "gpu02", "gpu03", "gpu7", "login"]
    slurm = LaunchEnv.from_env({"SLURM_PROCID": "4", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0",
                                "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "4(x2)",
                                "SLURM_NNODES": "2"})
    plan = plan_store(slurm, {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "77"})
    assert plan.endpoints == [("n1", 20077), ("n2", 20077)] and plan.serve == [1]
    # a default port never falls in the ephemeral range (32768 up) gloo and NCCL bind from
    late = plan_store(slurm, {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "1919999"})
    assert late.endpoints == [("n1", 29999), ("n2", 29999)]
    k8s = plan_store(le, {"NCL_STORE_HOST_TEMPLATE": "job-{node}.svc", "NCL_STORE_PORT": "9"})
    assert k8s.endpoints == [("job-0.svc", 9), ("job-1.svc", 9)] and k8s.serve == []
    one = LaunchEnv.from_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2",
                              "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1",
                              "MASTER_PORT": "600"})
    plan = plan_store(one, {})
    assert plan.endpoints == [("127.0.0.1", 601 + i) for i in range(4)] and plan.serve == [2]
    with pytest.raises(ValueError, match="host:port"):
        parse_endpoints("nohost")


def test_server_survives_garbage_and_reports_counts(job, servers):
    store = connect(eps(servers[:1]), job, 2 * SECONDS)
    store.set("x", "1")
    with socket.create_connection(servers[0].endpoint, timeout=2) as raw:
        raw.recv(64)
        raw.sendall(struct.pack("<BI", 99, 1 << 30))  # absurd frame before authenticating
        status, n = wire.HDR.unpack(raw.recv(5))
        assert status == wire.ERROR
    assert store.get("x") == b"1"
    counts = store.server_op_counts()[f"127.0.0.1:{servers[0].port}"]
    assert counts["set"] == 1 and counts["get"] == 1 and counts["refused"] == 1


def test_members_only_groups_where_valid(job, servers, monkeypatch):
    """gloo: members only; NCCL with a bound device: world-wide (ncclCommSplit needs every
    rank); NCCL without one: members only (unique-id exchange among members)."""
    import torch

    from nemo_checkpointless.megatron import groups

    store = connect(eps(servers), job, 5 * SECONDS)
    dist.init_process_group("gloo", store=dist.PrefixStore("pg/0", store), rank=0, world_size=1)
    try:
        world = dist.distributed_c10d._get_default_group()
        assert groups.supported() and groups.members_only("gloo") and groups.members_only(None)
        assert groups.members_only("nccl")
        monkeypatch.setattr(type(world), "bound_device_id", torch.device("cuda", 0),
                            raising=False)
        assert not groups.members_only("nccl") and groups.members_only("gloo")
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()


def test_a_node_replaced_on_another_host_is_found_through_its_published_endpoint(job, servers):
    store = connect(eps(servers), job, 3 * SECONDS)
    key = next(f"pg/1/k{i}" for i in range(100) if store.shard(f"pg/1/k{i}") == 1)
    store.set(key, "before")
    servers[1].stop()
    # the scheduler's replacement for node 1 runs on another host (127.0.0.2 is a loopback
    # address of its own) and another port; its agent serves shard 1 there and says so
    moved = StoreServer("127.0.0.2", 0, job).start()
    servers[1] = moved
    agent = connect([*eps(servers)[:1], moved.endpoint, *eps(servers)[2:]], job, 3 * SECONDS)
    agent.publish_endpoint(1, moved.endpoint)
    store.set(key, "after")                 # the old client follows shard 1 to its new home
    assert store.endpoints[1] == moved.endpoint
    assert agent.get(key) == b"after"
    stale = connect(eps(servers)[:1] + [("127.0.0.1", free_port())] + eps(servers)[2:], job,
                    3 * SECONDS)
    assert stale.refresh_endpoints()[1] == moved.endpoint   # a new agent's stale peer list
    assert stale.get(key) == b"after"


def test_a_generation_forms_its_world_over_fresh_connections(job, servers):
    """Every server replaced at its address since the last generation (a lost node came
    back): the connections cached from before are stale, and a gloo address key sent on
    one without an ack would vanish. rendezvous() forms the world over fresh ones."""
    from nemo_checkpointless.comm.rendezvous import rendezvous

    store = connect(eps(servers), job, 5 * SECONDS)
    for k in range(16):  # a connection to every server, cached on this thread
        store.set(f"warm/{k}", "1")
    for i, old in enumerate(list(servers)):
        port = old.port
        old.stop()
        servers[i] = StoreServer("127.0.0.1", port, job).start()
    rendezvous(store, 1, 0, 1, "gloo", 5 * SECONDS, 5 * SECONDS, cancelled=lambda: False)
    _one_rank_world_reduces()


def _interrupt_soon(store, delay: float = 0.5) -> list:
    """Interrupt this (the calling) thread's store wait from another thread after
    ``delay`` seconds, retrying until it was waiting; the list gets the connections shut."""
    me, woken = threading.get_ident(), []

    def run() -> None:
        deadline = time.monotonic() + 10
        time.sleep(delay)
        while time.monotonic() < deadline:
            n = store.interrupt(me)
            if n:
                woken.append(n)
                return
            time.sleep(0.05)

    threading.Thread(target=run, daemon=True).start()
    return woken


@pytest.mark.parametrize("op", ["get", "wait"])
def test_a_blocked_wait_is_interrupted_from_another_thread(job, servers, op):
    from nemo_checkpointless.comm.identity import StoreInterrupted

    store = connect(eps(servers), job, datetime.timedelta(seconds=30))
    assert store.interrupt(threading.get_ident()) == 0  # not waiting: nothing to wake
    woken = _interrupt_soon(store)
    t0 = time.monotonic()
    with pytest.raises(StoreInterrupted, match="interrupted"):
        getattr(store, op)("never/written") if op == "get" else store.wait(["never/written"])
    assert time.monotonic() - t0 < 5 and woken == [1]
    store.set("never/written", "now")  # the thread's next request reconnects
    assert store.get("never/written") == b"now"


def test_a_world_forming_for_a_generation_the_job_left_is_interrupted(job, servers):
    """The flake seen in CI (test-nemo, 2026-12-03): two ranks met at generation 3's
    barrier; one of them learned of generation 4 before it saw the barrier complete and
    left, while the other had passed it and waited inside gloo's address exchange for a
    key the first never writes. No communicator abort reaches that store wait; the agent
    link's interrupt does, and the process then forms the next generation's world."""
    from nemo_checkpointless.comm.rendezvous import rendezvous

    store = connect(eps(servers), job, datetime.timedelta(seconds=60))
    store.add("rdzv/3/arrived", 1)  # rank 1 arrived, then left for generation 4
    woken = _interrupt_soon(store)
    t0 = time.monotonic()
    with pytest.raises(Exception, match="interrupted"):
        rendezvous(store, 3, 0, 2, "gloo", 60 * SECONDS, 60 * SECONDS,
                   cancelled=lambda: False)
    assert time.monotonic() - t0 < 10 and woken
    assert not dist.is_initialized()
    rendezvous(store, 4, 0, 1, "gloo", 5 * SECONDS, 5 * SECONDS, cancelled=lambda: False)
    _one_rank_world_reduces()


def test_a_peer_list_from_before_a_takeover_finds_the_shard_through_the_standby_addresses(job):
    """Node 1's shard moved to a standby; node 0 then came back with an empty server and the
    job's first peer list (a restarted pod). Its servers know nothing; the standby addresses
    every agent is given (--standby-peers) do."""
    node0 = StoreServer("127.0.0.1", 0, job).start()
    standby = StoreServer("127.0.0.3", 0, job).start()
    gone = ("127.0.0.1", free_port())  # node 1's first address: nothing listens there
    try:
        at_standby = connect([node0.endpoint, standby.endpoint], job, 3 * SECONDS)
        at_standby.publish_endpoint(1, standby.endpoint)
        node0.stop()
        node0 = StoreServer("127.0.0.1", node0.port, job).start()  # restarted, empty
        spare_slot = ("127.0.0.4", free_port())  # another standby's, not serving
        stale = connect([node0.endpoint, gone], job, 3 * SECONDS,
                        lookups=[spare_slot, standby.endpoint])
        assert stale.refresh_endpoints(skip=0)[1] == standby.endpoint
        blind = connect([node0.endpoint, gone], job, 3 * SECONDS)
        assert blind.refresh_endpoints(skip=0)[1] == gone  # without them: nothing to find
    finally:
        node0.stop()
        standby.stop()
