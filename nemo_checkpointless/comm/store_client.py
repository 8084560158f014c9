"""The client: a ``torch.distributed.Store`` whose keys are spread over the job's servers.

Routing: key -> server ``crc32(key) % n`` (every client must list the servers in the same
order; ``NCL_STORE_ENDPOINTS`` does). Replicated keys (``gen`` by default) are integer
max-registers kept on every server: reads take the maximum over the servers that answer
and repair those behind; ``add`` raises the first reachable server to that maximum and
increments there, then raises the others. Concurrent bumps through the same primary get
distinct values; bumps racing a primary's death may coincide (they name one recovery).

Round trips saved: ``wait([k])`` returns k's value, so gloo's ``wait(k); get(k)`` costs
one; inside :meth:`ShardedStore.rendezvous_hint` a gloo group's address keys are fetched
with one multi-key wait per server instead of one round trip per member, and its own
address is written without waiting for the ack (write-once keys only).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import re
import secrets
import socket
import struct
import threading
import time
import zlib
from typing import Iterable, Optional, Sequence

import torch.distributed as dist

from . import wire
from .identity import (AdmissionError, Endpoint, JobIdentity, StoreError, StoreInterrupted,
                       format_endpoints, parse_endpoints)

log = logging.getLogger(__name__)


def connect_timeout() -> float:
    """Seconds for one TCP connect attempt (``timeouts.store_connect_s``)."""
    from ..timeouts import Timeouts

    return Timeouts.from_env().store_connect_s


def _open(endpoint: Endpoint, timeout: float) -> socket.socket:
    """A connected TCP socket; IP literals skip name resolution entirely."""
    host, port = endpoint
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock
    return socket.create_connection((host, port), timeout=timeout)


class _Link:
    """One authenticated connection from one thread to one server.

    The server's proof of the secret is read together with the first reply (the first
    request is pipelined behind the client's proof; the server serves it only after
    checking that proof). Sets sent with ``ack=False`` have their acks read before the
    next reply.
    """

    __slots__ = ("sock", "buf", "endpoint", "recv_timeout", "pending_proof", "unacked",
                 "identity", "interrupted")

    def __init__(self, endpoint: Endpoint, identity: JobIdentity, timeout: float) -> None:
        self.endpoint, self.identity = endpoint, identity
        self.buf = bytearray()
        self.recv_timeout, self.unacked = 0.0, 0
        self.interrupted = False  # shut down by another thread (ShardedStore.interrupt)
        self.sock = _open(endpoint, timeout)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            status, hello = self._frame()
            if status != wire.OK or not hello.startswith(wire.MAGIC):
                raise AdmissionError(f"{endpoint[0]}:{endpoint[1]} is not an ncl store server "
                                     f"(greeting {hello[:16]!r})")
            nonce, mine = hello[len(wire.MAGIC):], secrets.token_bytes(16)
            tag = identity.mac(b"client", nonce, mine)
            self.send(wire.AUTH, wire.blobs(identity.job_id.encode(), mine, tag))
            self.pending_proof = (mine, nonce)
            # From here on the socket blocks in the kernel (no poll per call); the kernel
            # receive timeout is the safety net against a host that vanished silently.
            self.sock.settimeout(None)
            self.set_recv_timeout(timeout)
        except BaseException:
            self.sock.close()
            raise

    def set_recv_timeout(self, seconds: float) -> None:
        if seconds <= self.recv_timeout:
            return
        sec = int(seconds)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                             struct.pack("ll", sec, int((seconds - sec) * 1e6)))
        self.recv_timeout = seconds

    def send(self, op: int, payload: bytes, ack: bool = True) -> None:
        self.sock.sendall(wire.HDR.pack(op, len(payload)) + payload)
        if not ack:
            self.unacked += 1

    def recv(self) -> tuple[int, bytes]:
        """The reply to the oldest outstanding request that waits for one."""
        if self.pending_proof is not None:
            self._check_proof()
        while self.unacked:
            status, reply = self._frame()
            self.unacked -= 1
            if status != wire.OK:
                raise StoreError(f"store {self._where()}: an earlier set failed: "
                                 f"{reply.decode(errors='replace')}")
        return self._frame()

    def _check_proof(self) -> None:
        mine, nonce = self.pending_proof
        status, proof = self._frame()
        if status != wire.OK:
            raise AdmissionError(f"store {self._where()} {proof.decode(errors='replace')}")
        if not self.identity.verify(proof, b"server", mine, nonce):
            raise AdmissionError(f"store {self._where()} does not know job "
                                 f"{self.identity.job_id!r}'s secret: another job's server "
                                 "holds this port")
        self.pending_proof = None

    def _frame(self) -> tuple[int, bytes]:
        buf = self.buf
        while len(buf) < 5:
            self._fill()
        status, n = wire.HDR.unpack_from(buf)
        while len(buf) < 5 + n:
            self._fill()
        payload = bytes(buf[5:5 + n])
        del buf[:5 + n]
        return status, payload

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionResetError(f"store server {self._where()} closed the connection")
        self.buf += chunk

    def _where(self) -> str:
        return f"{self.endpoint[0]}:{self.endpoint[1]}"

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _int_or_none(value: bytes) -> Optional[int]:
    try:
        return int(value)
    except ValueError:
        return None


class ShardedStore(dist.Store):
    """A ``torch.distributed.Store`` whose keys are spread over several store servers.

    Thread-safe: every thread has its own connections, made lazily and remade after a
    server is replaced (same host:port). ``op_counts()`` counts the requests this client
    sent to each server; ``server_op_counts()`` asks every server for its own counts.

    Every instance stays referenced until :meth:`close`: torch's C++ side (a PrefixStore,
    a process group) holds only the pybind trampoline, and a collected Python object would
    turn each later call into "Not implemented".
    """

    _live: set = set()
    _RDZV_KEY = re.compile(rb"^(.*/cpu/.*/)(\d+)$")

    def __init__(self, endpoints: Sequence[Endpoint], identity: JobIdentity,
                 timeout: datetime.timedelta = datetime.timedelta(seconds=60),
                 replicated: Iterable[str] = ("gen", "gen/", "node/", "job/"),
                 down_backoff: float = 1.0, lookups: Sequence[Endpoint] = ()) -> None:
        super().__init__()
        if not endpoints:
            raise ValueError("no store endpoint given")
        self.endpoints = [(h, int(p)) for h, p in endpoints]
        # where standbys serve a shard once they take a node over: asked, after the
        # servers, where a server moved (a peer list from before a takeover finds it)
        self.lookups = [(h, int(p)) for h, p in lookups]
        self.identity = identity
        self.set_timeout(timeout)
        self._replicated = tuple(wire.as_bytes(k) for k in replicated)
        self._down_backoff = down_backoff
        self._down_until = [0.0] * len(self.endpoints)
        self._rehome_after = [0.0] * len(self.endpoints)
        self._local = threading.local()
        self._counts_lock = threading.Lock()
        self._counts = [0] * len(self.endpoints)
        # the links each thread is blocked on now, in a server-side wait (interrupt())
        self._blocked_lock = threading.Lock()
        self._blocked: dict[int, list[_Link]] = {}
        ShardedStore._live.add(self)

    __hash__ = object.__hash__

    # -- connections ----------------------------------------------------------------
    def _state(self):
        loc = self._local
        if not hasattr(loc, "links"):
            loc.links = [None] * len(self.endpoints)
            loc.prefetch = None  # (key, value) returned by the last wait([key])
            loc.cache = {}  # rendezvous keys fetched in a batch
            loc.group_size = None
        return loc

    def shard(self, key) -> int:
        return zlib.crc32(wire.as_bytes(key)) % len(self.endpoints)

    def is_replicated(self, key: bytes) -> bool:
        return any(key == r or (r.endswith(b"/") and key.startswith(r))
                   for r in self._replicated)

    def _timeout_s(self) -> float:
        return self.timeout.total_seconds()

    def _where(self, i: int) -> str:
        return f"{self.endpoints[i][0]}:{self.endpoints[i][1]}"

    def _link(self, i: int, deadline: float, quick: bool = False) -> _Link:
        """This thread's connection to server ``i``; retries until ``deadline``."""
        links = self._state().links
        if links[i] is not None and links[i].interrupted:  # shut down by interrupt()
            self._drop(i)
        if links[i] is not None:
            return links[i]
        delay, last, start = 0.02, None, time.monotonic()
        while True:
            try:
                links[i] = _Link(self.endpoints[i], self.identity,
                                 max(0.05, min(connect_timeout(), deadline - time.monotonic())))
                self._down_until[i] = 0.0
                return links[i]
            except OSError as err:
                last = err
                if self._rehome(i):  # its node was replaced on another host: go there
                    continue
            if quick or time.monotonic() + delay > deadline:
                if time.monotonic() - start > 0.25:  # slow (silent host): skip it a while
                    self._down_until[i] = time.monotonic() + self._down_backoff
                raise StoreError(
                    f"store server {self._where(i)} (shard {i} of {len(self.endpoints)}) is "
                    f"unreachable after {time.monotonic() - start:.1f} s: {last}. Check that "
                    "its node agent is running and that the peer list (NCL_STORE_ENDPOINTS) "
                    "names reachable hosts.") from last
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    # -- where each server lives ------------------------------------------------------
    # Server ``i`` is node rank ``i``'s agent. A replacement node may come up on another
    # host: its agent publishes ``node/<i>/endpoint`` (a replicated key, so every other
    # server holds it), and a client that cannot reach server ``i`` where it was looks
    # it up there and moves on.

    @staticmethod
    def endpoint_key(i: int) -> str:
        return f"node/{i}/endpoint"

    def publish_endpoint(self, i: int, endpoint: Endpoint) -> None:
        """Record that server ``i`` is now served at ``endpoint`` (on every server)."""
        self.endpoints[i] = (endpoint[0], int(endpoint[1]))
        self.set(self.endpoint_key(i), f"{endpoint[0]}:{int(endpoint[1])}")

    def refresh_endpoints(self, skip: Optional[int] = None) -> list[Endpoint]:
        """Adopt every published endpoint but ``skip``'s (a new agent's peer list may
        predate earlier replacements); returns the current list."""
        for i in range(len(self.endpoints)):
            if i != skip:
                self._adopt_endpoint(i, self._published(i, range(len(self.endpoints))))
        return list(self.endpoints)

    def _published(self, i: int, servers: Iterable[int]) -> Optional[bytes]:
        """``node/<i>/endpoint`` from the first of ``servers``, then of the standby
        addresses (``lookups``), that has it, over a connection of its own (this thread's
        links may have requests in flight)."""
        key = wire.as_bytes(self.endpoint_key(i))
        asked = [self.endpoints[j] for j in servers]
        for endpoint in asked + [e for e in self.lookups if e not in asked]:
            try:
                link = _Link(endpoint, self.identity, connect_timeout())
            except AdmissionError:
                raise
            except OSError:
                continue
            try:
                link.set_recv_timeout(connect_timeout())
                link.send(wire.PEEK, wire.blobs(key))
                status, reply = link.recv()
            except OSError:
                continue
            finally:
                link.close()
            value = wire.unblobs(reply)[0] if status == wire.OK else None
            if value:
                return value
        return None

    def _adopt_endpoint(self, i: int, value: Optional[bytes]) -> bool:
        if not value:
            return False
        (endpoint,) = parse_endpoints(value.decode())
        if endpoint == self.endpoints[i]:
            return False
        log.warning("store server %d moved from %s to %s:%d (replaced node)", i,
                    self._where(i), *endpoint)
        self.endpoints[i] = endpoint
        self._down_until[i] = 0.0
        return True

    def _rehome(self, i: int) -> bool:
        """Server ``i`` is unreachable where we knew it: ask the others whether it moved.
        At most one lookup per server every 0.25 s; never nested."""
        loc = self._state()
        now = time.monotonic()
        if getattr(loc, "rehoming", False) or now < self._rehome_after[i] or \
                len(self.endpoints) == 1:
            return False
        self._rehome_after[i] = now + 0.25
        loc.rehoming = True
        try:
            value = self._published(i, [j for j in range(len(self.endpoints)) if j != i])
        except (OSError, StoreError):
            return False
        finally:
            loc.rehoming = False
        if self._adopt_endpoint(i, value):
            self._drop(i)
            return True
        return False

    def drop_links(self) -> None:
        """Forget this thread's connections (the next request to each server reconnects).
        A connection to a server that died since (its node was lost, or replaced at the
        same address) can still take a write without an error; a set sent without an ack
        (``rendezvous_hint``) would vanish in it."""
        for i in range(len(self.endpoints)):
            self._drop(i)

    @contextlib.contextmanager
    def _blocking(self, links: Sequence[_Link]):
        """This thread waits on ``links`` (a server-side wait): :meth:`interrupt` may shut
        them down meanwhile."""
        me = threading.get_ident()
        with self._blocked_lock:
            self._blocked[me] = list(links)
        try:
            yield
        finally:
            with self._blocked_lock:
                self._blocked.pop(me, None)

    def interrupt(self, thread_ident: int) -> int:
        """Wake thread ``thread_ident`` from the server-side wait it is blocked in now (a
        ``wait``/``get`` for a key nobody will write: a process group of a generation the
        job has left forms with store waits that no communicator abort reaches): that
        operation raises :class:`StoreInterrupted`. Returns the connections shut down (0:
        the thread was not waiting). Its next request reconnects."""
        with self._blocked_lock:
            links = self._blocked.get(thread_ident, [])
            for link in links:
                link.interrupted = True
                try:
                    link.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return len(links)

    def _link_error(self, i: int, link: _Link, what: str, err: BaseException) -> StoreError:
        """The error for ``link`` to server ``i`` failing during ``what`` (dropped)."""
        self._drop(i)
        if link.interrupted:
            return StoreInterrupted(f"store {self._where(i)}: {what} interrupted: the job "
                                    "moved on while this thread waited")
        return StoreError(f"store server {self._where(i)} lost during {what}: {err}")

    def _drop(self, i: int) -> None:
        links = self._state().links
        if links[i] is not None:
            links[i].close()
            links[i] = None

    def _count(self, i: int) -> None:
        with self._counts_lock:
            self._counts[i] += 1

    def _call(self, i: int, op: int, payload: bytes, deadline: Optional[float] = None,
              retry: bool = True, quick: bool = False) -> bytes:
        """One request to server ``i``; reconnects once if the connection was lost.
        ``quick``: one connection attempt, no waiting for an absent server."""
        if deadline is None:
            deadline = time.monotonic() + self._timeout_s()
        self._state().prefetch = None
        self._count(i)
        for attempt in (0, 1):
            link = self._link(i, deadline, quick)
            try:
                link.set_recv_timeout(deadline - time.monotonic() + 5.0)
                waits = op in (wire.WAIT, wire.GET)  # waits on the server: interruptible
                with self._blocking((link,)) if waits else contextlib.nullcontext():
                    link.send(op, payload)
                    status, reply = link.recv()
                break
            except AdmissionError:
                self._drop(i)
                raise
            except (OSError, ConnectionError) as err:
                if attempt or not retry or link.interrupted:
                    raise self._link_error(i, link, wire.OP_NAMES[op], err) from err
                self._drop(i)
        return self._reply(i, status, reply)

    def _reply(self, i: int, status: int, reply: bytes) -> bytes:
        if status == wire.OK:
            return reply
        kind = "timeout" if status == wire.TIMEOUT else "error"
        raise StoreError(f"store {self._where(i)} ({kind}): {reply.decode(errors='replace')}")

    def _fanout(self, op: int, payload: bytes) -> list[Optional[bytes]]:
        """One request to every server that answers (None where one is down); while none
        answers, keeps trying up to the store timeout."""
        deadline = time.monotonic() + self._timeout_s()
        while True:
            out = self._fanout_once(op, payload)
            if any(r is not None for r in out):
                return out
            if time.monotonic() > deadline:
                raise StoreError(f"no store server of {format_endpoints(self.endpoints)} "
                                 f"reachable within {self._timeout_s():.1f} s")
            time.sleep(0.1)
            self._down_until = [0.0] * len(self.endpoints)

    def _fanout_once(self, op: int, payload: bytes,
                     indices: Optional[Sequence[int]] = None) -> list[Optional[bytes]]:
        n = len(self.endpoints)
        now = time.monotonic()
        sent: list[Optional[_Link]] = [None] * n
        for i in range(n) if indices is None else indices:
            if self._down_until[i] > now:
                continue
            try:
                link = self._link(i, now + connect_timeout(), quick=True)
                link.set_recv_timeout(self._timeout_s())
                link.send(op, payload)
                sent[i] = link
            except (OSError, StoreError) as err:
                self._drop(i)
                if isinstance(err, AdmissionError):
                    raise
        out: list[Optional[bytes]] = [None] * n
        for i, link in enumerate(sent):
            if link is None:
                continue
            try:
                status, reply = link.recv()
            except AdmissionError:
                self._drop(i)
                raise
            except OSError:  # the server went away: reconnect next time
                self._drop(i)
                continue
            self._count(i)
            out[i] = self._reply(i, status, reply)
        self._state().prefetch = None
        return out

    # -- replicated keys ------------------------------------------------------------
    # Counters (``add``) are max-registers; other values are records written to every
    # server. A read takes the maximum when every copy is an integer, else the first copy
    # in server order, and repairs the servers that miss it or lag behind.

    def _replicated_read(self, key: bytes) -> Optional[bytes]:
        return self._resolve_and_repair(key, self._fanout(wire.PEEK, wire.blobs(key)))

    def _resolve_and_repair(self, key: bytes, replies: list[Optional[bytes]]) -> Optional[bytes]:
        copies = {i: wire.unblobs(r)[0] for i, r in enumerate(replies) if r is not None}
        present = [v for v in copies.values() if v is not None]
        if not present:
            return None
        fresh = [i for i, v in copies.items() if v is None]
        if fresh:  # a replaced (empty) server: give it every replicated key at once
            self.resync_replicated(fresh)
        ints = [_int_or_none(v) for v in present]
        if all(x is not None for x in ints):
            top = max(ints)
            value = str(top).encode()
            behind = [i for i, v in copies.items() if v is None or int(v) < top]
            payload, op = self._max_payload(key, top, 0), wire.MAX_SET
        else:
            value = present[0]
            behind = [i for i, v in copies.items() if v is None]
            payload, op = wire.blobs(key, value), wire.RSET
        if behind:  # read repair: a replaced server learns the value again
            self._fanout_once(op, payload, behind)
        return value

    def resync_replicated(self, targets: Optional[Sequence[int]] = None) -> int:
        """Merge every server's replicated keys and write the merge to ``targets`` (all
        servers by default). Done automatically when a read finds a server missing a key
        the others hold (a replaced agent); returns the number of keys merged."""
        everyone = list(range(len(self.endpoints)))
        targets = everyone if targets is None else list(targets)
        merged: dict[bytes, bytes] = {}
        for reply in self._fanout_once(wire.DUMP, b"", [i for i in everyone]):
            if reply is None:
                continue
            items = wire.unblobs(reply)
            for k, v in zip(items[::2], items[1::2]):
                merged[k] = wire.merged(merged.get(k), v)
        if merged:
            self._fanout_once(wire.MERGE, wire.blobs(*(x for kv in merged.items() for x in kv)),
                              targets)
        return len(merged)

    @staticmethod
    def _max_payload(key: bytes, floor: int, delta: int) -> bytes:
        return wire.I64.pack(floor) + wire.I64.pack(delta) + wire.blobs(key)

    def _primary(self) -> int:
        """The first server that answers (replicated counters increment there)."""
        now = time.monotonic()
        for i in range(len(self.endpoints)):
            if self._down_until[i] <= now and self._probe(i):
                return i
        raise StoreError(f"no store server of {format_endpoints(self.endpoints)} reachable")

    def _probe(self, i: int) -> bool:
        try:
            self._link(i, time.monotonic() + connect_timeout(), quick=True)
            return True
        except AdmissionError:
            raise
        except StoreError:
            return False

    def _replicated_add(self, key: bytes, delta: int) -> int:
        top = _int_or_none(self._replicated_read(key) or b"0")
        if top is None:
            raise StoreError(f"add on {key.decode()!r}, which holds a non-integer record")
        last: Optional[Exception] = None
        for i in range(len(self.endpoints)):  # primary: the first server that answers
            if self._down_until[i] > time.monotonic():
                continue
            try:
                reply = self._call(i, wire.MAX_ADD, self._max_payload(key, top, delta),
                                   retry=False, quick=True)
            except StoreError as err:
                if isinstance(err, AdmissionError):
                    raise
                last = err
                continue
            (value,) = wire.I64.unpack(reply)
            others = [j for j in range(len(self.endpoints)) if j != i]
            self._fanout_once(wire.MAX_SET, self._max_payload(key, value, 0), others)
            return value
        raise StoreError(f"no store server reachable to update {key.decode()!r}: {last}")

    def _replicated_wait(self, key: bytes, ms: int) -> None:
        """Until any server has ``key``: a peek at all, then a wait on the primary (every
        write reaches the primary); a primary lost meanwhile hands over to the next."""
        deadline = time.monotonic() + (ms / 1000.0 if ms >= 0 else 1e9)
        while True:
            if self._replicated_read(key) is not None:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreError(f"store (timeout): timed out waiting for the replicated key "
                                 f"{key.decode()!r}")
            i = self._primary()
            try:
                self._call(i, wire.WAIT, wire.I64.pack(int(left * 1000)) + wire.blobs(key),
                           deadline=time.monotonic() + left + connect_timeout(), retry=False)
                return
            except (AdmissionError, StoreInterrupted):
                raise
            except StoreError as err:
                if "(timeout)" in str(err):
                    raise
                self._down_until[i] = time.monotonic() + self._down_backoff

    # -- torch.distributed.Store API --------------------------------------------------
    def set(self, key, value) -> None:
        key, value = wire.as_bytes(key), wire.as_bytes(value)
        if self.is_replicated(key):
            self._fanout(wire.RSET, wire.blobs(key, value))
            return
        i = self.shard(key)
        loc = self._state()
        if loc.group_size and self._RDZV_KEY.match(key):  # write-once gloo address key
            self._count(i)
            deadline = time.monotonic() + self._timeout_s()
            self._link(i, deadline).send(wire.SET, wire.blobs(key, value), ack=False)
            return
        self._call(i, wire.SET, wire.blobs(key, value))

    def get(self, key) -> bytes:
        key = wire.as_bytes(key)
        loc = self._state()
        pre = loc.prefetch
        if pre is not None and pre[0] == key:
            loc.prefetch = None
            return pre[1]
        if key in loc.cache:
            return loc.cache.pop(key)
        if self.is_replicated(key):
            value = self._replicated_read(key)
            if value is None:
                self._replicated_wait(key, wire.millis(self.timeout))
                value = self._replicated_read(key)
            return value
        ms = wire.millis(self.timeout)
        reply = self._call(self.shard(key), wire.GET, wire.I64.pack(ms) + wire.blobs(key),
                           deadline=time.monotonic() + ms / 1000.0 + connect_timeout())
        return wire.unblobs(reply)[0]

    def add(self, key, value: int) -> int:
        key = wire.as_bytes(key)
        if self.is_replicated(key):
            return self._replicated_add(key, int(value))
        reply = self._call(self.shard(key), wire.ADD, wire.I64.pack(int(value)) + wire.blobs(key))
        return wire.I64.unpack(reply)[0]

    def compare_set(self, key, expected_value, desired_value) -> bytes:
        key = wire.as_bytes(key)
        if self.is_replicated(key):
            raise StoreError(f"compare_set on the replicated key {key.decode()!r}: use add() "
                             "or set() (replicated keys are integer max-registers)")
        return self._call(self.shard(key), wire.CAS,
                          wire.blobs(key, wire.as_bytes(expected_value),
                                     wire.as_bytes(desired_value)))

    def wait(self, keys, timeout: Optional[datetime.timedelta] = None) -> None:
        keys = [wire.as_bytes(k) for k in keys]
        ms = wire.millis(self.timeout if timeout is None else timeout)
        deadline = time.monotonic() + ms / 1000.0 + connect_timeout()
        loc = self._state()
        if len(keys) == 1 and loc.group_size and self._rendezvous_wait(keys[0], ms, deadline):
            return
        for k in keys:
            if self.is_replicated(k):
                self._replicated_wait(k, max(0, int((deadline - connect_timeout()
                                                     - time.monotonic()) * 1000)))
        by_shard: dict[int, list[bytes]] = {}
        for k in keys:
            if not self.is_replicated(k):
                by_shard.setdefault(self.shard(k), []).append(k)
        for i, ks in by_shard.items():
            reply = self._call(i, wire.WAIT, wire.I64.pack(ms) + wire.blobs(*ks), deadline)
            if len(keys) == 1:  # gloo's wait(k); get(k) costs one round trip, not two
                loc.prefetch = (ks[0], wire.unblobs(reply)[0])

    @contextlib.contextmanager
    def rendezvous_hint(self, size: int):
        """While a gloo group of ``size`` members forms on this thread, fetch all members'
        address keys (``.../cpu/.../<rank>``, written once each) with one multi-key wait per
        server, and send this member's own without waiting for the ack. Only valid around
        ``init_process_group``/``new_group`` of a gloo group of exactly ``size`` ranks."""
        loc = self._state()
        loc.group_size = size
        try:
            yield self
        finally:
            loc.group_size = None
            loc.cache = {}

    def _rendezvous_wait(self, key: bytes, ms: int, deadline: float) -> bool:
        loc = self._state()
        if key in loc.cache:
            loc.prefetch = (key, loc.cache.pop(key))
            return True
        m = self._RDZV_KEY.match(key)
        if m is None or int(m.group(2)) >= loc.group_size:
            return False
        by_shard: dict[int, list[bytes]] = {}
        for r in range(loc.group_size):
            k = m.group(1) + str(r).encode()
            by_shard.setdefault(self.shard(k), []).append(k)
        loc.prefetch = None
        links = {}
        for i, ks in by_shard.items():  # pipelined: every server waits at once
            self._count(i)
            links[i] = self._link(i, deadline)
            links[i].set_recv_timeout(deadline - time.monotonic() + 5.0)
        with self._blocking(list(links.values())):
            for i, ks in by_shard.items():
                links[i].send(wire.WAIT, wire.I64.pack(ms) + wire.blobs(*ks))
            for i, link in links.items():
                try:
                    status, reply = link.recv()
                except OSError as err:
                    raise self._link_error(i, link, "a rendezvous wait", err) from err
                loc.cache.update(zip(by_shard[i],
                                     wire.unblobs(self._reply(i, status, reply))))
        loc.prefetch = (key, loc.cache.pop(key))
        return True

    def check(self, keys) -> bool:
        for k in (wire.as_bytes(k) for k in keys):
            if self.is_replicated(k):
                if self._replicated_read(k) is None:
                    return False
            elif not wire.I64.unpack(self._call(self.shard(k), wire.CHECK, wire.blobs(k)))[0]:
                return False
        return True

    def delete_key(self, key) -> bool:
        key = wire.as_bytes(key)
        if self.is_replicated(key):
            replies = self._fanout(wire.DELETE, wire.blobs(key))
            return any(r is not None and wire.I64.unpack(r)[0] for r in replies)
        return bool(wire.I64.unpack(self._call(self.shard(key), wire.DELETE, wire.blobs(key)))[0])

    def num_keys(self) -> int:
        replies = [r for r in self._fanout(wire.NUM_KEYS, b"") if r is not None]
        plain = sum(wire.I64.unpack_from(r)[0] - wire.I64.unpack_from(r, 8)[0] for r in replies)
        return plain + max((wire.I64.unpack_from(r, 8)[0] for r in replies), default=0)

    def multi_get(self, keys) -> list[bytes]:
        return [self.get(k) for k in keys]

    def multi_set(self, keys, values) -> None:
        for k, v in zip(keys, values):
            self.set(k, v)

    def append(self, key, value) -> None:
        key = wire.as_bytes(key)
        self._call(self.shard(key), wire.APPEND, wire.blobs(key, wire.as_bytes(value)),
                   retry=False)

    def has_extended_api(self) -> bool:
        return True

    def clone(self) -> "ShardedStore":
        return ShardedStore(self.endpoints, self.identity, self.timeout,
                            [r.decode() for r in self._replicated], self._down_backoff,
                            self.lookups)

    # -- beyond torch's API -----------------------------------------------------------
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix`` on every reachable server (old generations)."""
        replies = self._fanout(wire.DELETE_PREFIX, wire.blobs(wire.as_bytes(prefix)))
        return sum(wire.I64.unpack(r)[0] for r in replies if r is not None)

    def ping_all(self, timeout: Optional[datetime.timedelta] = None,
                 key: str = "gen") -> Optional[bytes]:
        """Reach every server (each retried up to ``timeout``) and read the replicated
        ``key`` in the same round trip; raise naming every unreachable server."""
        secs = (timeout or self.timeout).total_seconds()
        deadline = time.monotonic() + secs
        kb = wire.as_bytes(key)
        errors, links = [], {}
        for i in range(len(self.endpoints)):
            try:
                links[i] = self._link(i, deadline)
                links[i].set_recv_timeout(secs + 5.0)
                links[i].send(wire.PEEK, wire.blobs(kb))
            except AdmissionError:
                raise
            except (OSError, StoreError) as err:
                self._drop(i)
                errors.append(f"{self._where(i)} ({err.__cause__ or err})")
        replies: list[Optional[bytes]] = [None] * len(self.endpoints)
        for i, link in links.items():
            try:
                replies[i] = self._reply(i, *link.recv())
                self._count(i)
            except AdmissionError:
                self._drop(i)
                raise
            except OSError as err:
                self._drop(i)
                errors.append(f"{self._where(i)} ({err})")
        if errors:
            raise StoreError(f"{len(errors)} of {len(self.endpoints)} store servers unreachable "
                             f"within {secs:.1f} s: {'; '.join(errors)}. Check the peer list "
                             "(NCL_STORE_ENDPOINTS / the Slurm node list / the headless "
                             "service) and that every node's agent is up.")
        return self._resolve_and_repair(kb, replies)

    def probe_servers(self, peek: bytes) -> list[Optional[bytes]]:
        """One PEEK (``wire.blobs(key, ...)``) at every server at once: the reply of each,
        or None for a server that did not answer (down, or backing off after a failure)."""
        return self._fanout_once(wire.PEEK, peek)

    def op_counts(self) -> dict[str, int]:
        """Requests this client sent, per server (``host:port`` -> count)."""
        with self._counts_lock:
            return {f"{h}:{p}": c for (h, p), c in zip(self.endpoints, self._counts)}

    def server_op_counts(self) -> dict[str, dict[str, int]]:
        """Every reachable server's own counts (all clients), ``host:port`` -> counts."""
        replies = self._fanout(wire.STATS, b"")
        return {f"{h}:{p}": json.loads(r) for (h, p), r in zip(self.endpoints, replies)
                if r is not None}

    def close(self) -> None:
        """Drop this thread's connections; the store may no longer back a process group."""
        for i in range(len(self.endpoints)):
            self._drop(i)
        ShardedStore._live.discard(self)
