"""The store server run by each node agent (or by a hosting rank): one thread, one loop.

A single-threaded ``selectors`` event loop over non-blocking sockets speaking
:mod:`~nemo_checkpointless.comm.wire`. Blocking reads (``get``/``wait``) park the
connection until the keys exist or the deadline passes; later requests on that connection
queue behind (per-connection order is preserved). No name lookups on accept.

Admission: every connection must first prove the job id and secret (HMAC challenge on a
fresh nonce); a wrong job id or secret is refused with the reason and closed before any
key is read or written; ``refused`` counts them. A connection that does not authenticate
within ``HANDSHAKE_TIMEOUT_S`` (10 s) is closed.

Replicated keys are integer max-registers (``max_set``/``max_add``): the client keeps
them on every server; a server only needs the max semantics.
"""

from __future__ import annotations

import heapq
import json
import logging
import secrets
import selectors
import socket
import threading
import time
from collections import Counter
from typing import Optional

from . import wire
from .identity import Endpoint, JobIdentity

log = logging.getLogger(__name__)


class _Waiter:
    """A blocked ``get``/``wait``: its connection, keys, how many are missing, deadline."""

    __slots__ = ("conn", "keys", "missing", "deadline", "done")

    def __init__(self, conn, keys, deadline):
        self.conn, self.keys, self.deadline, self.done = conn, keys, deadline, False
        self.missing = 0


class _Conn:
    """One client connection: buffers, whether it proved the identity, a parked wait."""

    __slots__ = ("sock", "inbuf", "outbuf", "authed", "nonce", "blocked", "since", "peer",
                 "waiter")

    def __init__(self, sock, peer):
        self.sock, self.peer = sock, peer
        self.inbuf, self.outbuf = bytearray(), bytearray()
        self.authed, self.blocked = False, False
        self.waiter: Optional[_Waiter] = None
        self.nonce = secrets.token_bytes(16)
        self.since = time.monotonic()


class StoreServer:
    """A store server run by one node agent: one thread, one event loop, binary protocol.

    ``port=0`` picks a free port. The server answers only clients that prove the job's
    identity; ``op_counts()`` counts the operations it served (``total`` plus one entry per
    operation kind, and ``refused`` connections).
    """

    HANDSHAKE_TIMEOUT_S = 10.0

    @classmethod
    def for_address(cls, host: str, port: int, identity: JobIdentity) -> "StoreServer":
        """A server for clients that reach it at ``host``: bound to every interface, or to
        the loopback only when ``host`` is the loopback (not started yet)."""
        bind = host if host in ("127.0.0.1", "localhost") else "0.0.0.0"
        return cls(bind, port, identity)

    def __init__(self, host: str, port: int, identity: JobIdentity) -> None:
        self.host = host
        self._port = port
        self.identity = identity
        self._data: dict[bytes, bytes] = {}
        self._replicated: set[bytes] = set()
        self._waiters: dict[bytes, list[_Waiter]] = {}
        self._deadlines: list[tuple[float, int, _Waiter]] = []
        self._seq = 0
        self._counts: Counter = Counter()
        self._lock = threading.Lock()  # guards _counts for op_counts() from other threads
        self._sel: Optional[selectors.BaseSelector] = None
        self._listener: Optional[socket.socket] = None
        self._wake_r = self._wake_w = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    # -- lifecycle ------------------------------------------------------------------
    def bind(self) -> "StoreServer":
        """Bind and listen (without serving yet); raises OSError if the port is taken."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        ls = socket.socket(family, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            ls.bind((self.host, self._port))
        except OSError as err:
            ls.close()
            raise OSError(err.errno, f"store server cannot listen on {self.host}:{self._port}: "
                                     f"{err.strerror}; is another agent or job using that port?")
        ls.listen(4096)
        ls.setblocking(False)
        self._listener = ls
        self._port = ls.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(ls, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        return self

    def start(self) -> "StoreServer":
        if self._listener is None:
            self.bind()
        self._thread = threading.Thread(target=self.serve_forever, name=f"ncl-store:{self._port}",
                                        daemon=True)
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        return self._port

    @property
    def endpoint(self) -> Endpoint:
        return (self.host, self._port)

    def op_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def stop(self) -> None:
        self._stopping = True
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        if self._wake_w is not None:
            self._wake_w.close()
            self._wake_w = None

    # -- event loop -----------------------------------------------------------------
    def serve_forever(self) -> None:
        sel = self._sel
        try:
            while not self._stopping:
                timeout = None
                if self._deadlines:
                    timeout = max(0.0, self._deadlines[0][0] - time.monotonic())
                for key, events in sel.select(timeout):
                    if key.data is None:
                        self._accept()
                    elif key.data == "wake":
                        try:
                            self._wake_r.recv(64)
                        except OSError:
                            pass
                    else:
                        conn = key.data
                        if events & selectors.EVENT_WRITE:
                            self._flush(conn)
                        if events & selectors.EVENT_READ:
                            self._read(conn)
                self._expire()
        finally:
            for key in list(sel.get_map().values()):
                try:
                    key.fileobj.close()
                except OSError:
                    pass
            sel.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, peer)
            self._sel.register(sock, selectors.EVENT_READ, conn)
            with self._lock:
                self._counts["connections"] += 1
            self._send(conn, wire.OK, wire.MAGIC + conn.nonce)
            self._push_deadline(conn.since + self.HANDSHAKE_TIMEOUT_S, _Waiter(conn, (), 0.0))

    def _close(self, conn: _Conn) -> None:
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        conn.blocked = True  # drop anything still queued
        if conn.waiter is not None:
            self._retire(conn.waiter)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.inbuf += data
        self._process(conn)

    def _process(self, conn: _Conn) -> None:
        buf = conn.inbuf
        off = 0
        while not conn.blocked and len(buf) - off >= 5:
            op, n = wire.HDR.unpack_from(buf, off)
            limit = wire.MAX_FRAME if conn.authed else wire.MAX_AUTH_FRAME
            if n > limit:
                self._refuse(conn, f"frame of {n} bytes exceeds the limit")
                return
            if len(buf) - off - 5 < n:
                break
            payload = bytes(buf[off + 5:off + 5 + n])
            off += 5 + n
            if not conn.authed:
                if not self._authenticate(conn, op, payload):
                    return
                continue
            self._dispatch(conn, op, payload)
        del buf[:off]

    def _authenticate(self, conn: _Conn, op: int, payload: bytes) -> bool:
        if op != wire.AUTH:
            self._refuse(conn, "not authenticated: a store client must first prove the job's "
                               "identity (nemo_checkpointless.comm.store.connect does this)")
            return False
        try:
            job_id, client_nonce, tag = wire.unblobs(payload)
            job_id_s = job_id.decode()
        except Exception:
            self._refuse(conn, "malformed authentication frame")
            return False
        me = self.identity
        if job_id_s != me.job_id:
            self._refuse(conn, f"refused: this store serves job {me.job_id!r}, not {job_id_s!r}")
            return False
        if not me.verify(tag, b"client", conn.nonce, client_nonce):
            self._refuse(conn, f"refused: wrong secret for job {me.job_id!r}")
            return False
        conn.authed = True
        self._send(conn, wire.OK, me.mac(b"server", client_nonce, conn.nonce))
        return True

    def _refuse(self, conn: _Conn, message: str) -> None:
        with self._lock:
            self._counts["refused"] += 1
        log.warning("store %s:%d: %s (peer %s)", self.host, self._port, message, conn.peer)
        self._send(conn, wire.ERROR, message.encode())
        self._close(conn)

    def _send(self, conn: _Conn, status: int, payload: bytes = b"") -> None:
        frame = wire.HDR.pack(status, len(payload)) + payload
        if conn.outbuf:
            conn.outbuf += frame
            return
        try:
            sent = conn.sock.send(frame)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        if sent < len(frame):
            conn.outbuf += frame[sent:]
            try:
                self._sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
            except (KeyError, ValueError):
                pass

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        del conn.outbuf[:sent]
        if not conn.outbuf:
            try:
                self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
            except (KeyError, ValueError):
                pass

    # -- operations -----------------------------------------------------------------
    def _dispatch(self, conn: _Conn, op: int, p: bytes) -> None:
        if op not in (wire.STATS, wire.PING):
            with self._lock:
                self._counts[wire.OP_NAMES.get(op, "unknown")] += 1
                self._counts["total"] += 1
        data = self._data
        try:
            if op == wire.SET or op == wire.RSET:
                key, value = wire.unblobs(p)
                self._put(key, value)
                if op == wire.RSET:
                    self._replicated.add(key)
                self._send(conn, wire.OK)
            elif op == wire.GET or op == wire.WAIT:
                (ms,) = wire.I64.unpack_from(p)
                keys = wire.unblobs(p, 8)
                self._wait(conn, keys, ms)
            elif op == wire.ADD:
                (delta,) = wire.I64.unpack_from(p)
                (key,) = wire.unblobs(p, 8)
                value = int(data.get(key, b"0")) + delta
                self._put(key, str(value).encode())
                self._send(conn, wire.OK, wire.I64.pack(value))
            elif op == wire.CAS:
                key, expected, desired = wire.unblobs(p)
                cur = data.get(key)
                if cur is None:
                    if expected:
                        result = expected
                    else:
                        self._put(key, desired)
                        result = desired
                elif cur == expected:
                    self._put(key, desired)
                    result = desired
                else:
                    result = cur
                self._send(conn, wire.OK, result)
            elif op == wire.CHECK:
                ok = all(k in data for k in wire.unblobs(p))
                self._send(conn, wire.OK, wire.I64.pack(int(ok)))
            elif op == wire.DELETE:
                (key,) = wire.unblobs(p)
                found = data.pop(key, None) is not None
                self._replicated.discard(key)
                self._send(conn, wire.OK, wire.I64.pack(int(found)))
            elif op == wire.NUM_KEYS:
                counts = wire.I64.pack(len(data)) + wire.I64.pack(len(self._replicated))
                self._send(conn, wire.OK, counts)
            elif op == wire.MAX_SET or op == wire.MAX_ADD:
                floor, delta = wire.I64.unpack_from(p)[0], wire.I64.unpack_from(p, 8)[0]
                (key,) = wire.unblobs(p, 16)
                cur = int(data.get(key, b"0"))
                value = max(cur, floor) + (delta if op == wire.MAX_ADD else 0)
                self._replicated.add(key)
                if value != cur or key not in data:
                    self._put(key, str(value).encode())
                self._send(conn, wire.OK, wire.I64.pack(value))
            elif op == wire.DUMP:
                items = [x for k in self._replicated if k in data for x in (k, data[k])]
                self._send(conn, wire.OK, wire.blobs(*items))
            elif op == wire.MERGE:
                items = wire.unblobs(p)
                for k, v in zip(items[::2], items[1::2]):
                    value = wire.merged(data.get(k), v)
                    self._replicated.add(k)
                    if data.get(k) != value:
                        self._put(k, value)
                self._send(conn, wire.OK)
            elif op == wire.PEEK:
                self._send(conn, wire.OK, wire.blobs(*(data.get(k) for k in wire.unblobs(p))))
            elif op == wire.MULTI_SET:
                items = wire.unblobs(p)
                for i in range(0, len(items), 2):
                    self._put(items[i], items[i + 1])
                self._send(conn, wire.OK)
            elif op == wire.APPEND:
                key, value = wire.unblobs(p)
                self._put(key, data.get(key, b"") + value)
                self._send(conn, wire.OK)
            elif op == wire.DELETE_PREFIX:
                (prefix,) = wire.unblobs(p)
                doomed = [k for k in data if k.startswith(prefix)]
                for k in doomed:
                    del data[k]
                    self._replicated.discard(k)
                self._send(conn, wire.OK, wire.I64.pack(len(doomed)))
            elif op == wire.STATS:
                self._send(conn, wire.OK, json.dumps(self.op_counts()).encode())
            elif op == wire.PING:
                self._send(conn, wire.OK)
            else:
                self._send(conn, wire.ERROR, f"unknown store operation {op}".encode())
        except Exception as err:  # a malformed request must not kill the server
            self._send(conn, wire.ERROR, f"{wire.OP_NAMES.get(op, op)} failed: {err!r}".encode())

    def _put(self, key: bytes, value: bytes) -> None:
        self._data[key] = value
        waiters = self._waiters.pop(key, None)
        if not waiters:
            return
        for w in waiters:
            if w.done:
                continue
            w.missing -= 1
            if w.missing == 0:
                self._complete(w)

    def _wait(self, conn: _Conn, keys: list[bytes], ms: int) -> None:
        data = self._data
        missing = [k for k in keys if k not in data]
        if not missing:
            self._send(conn, wire.OK, wire.blobs(*(data[k] for k in keys)))
            return
        if ms == 0:
            self._send(conn, wire.TIMEOUT, f"keys {[k.decode(errors='replace') for k in missing]} "
                                      f"not set".encode())
            return
        deadline = time.monotonic() + (ms / 1000.0 if ms > 0 else 1e9)
        w = _Waiter(conn, keys, deadline)
        w.missing = len(missing)
        for k in missing:
            self._waiters.setdefault(k, []).append(w)
        conn.blocked = True
        conn.waiter = w
        self._push_deadline(deadline, w)

    def _retire(self, w: _Waiter) -> None:
        """Forget a waiter that timed out or whose client left."""
        w.done = True
        w.conn.waiter = None
        for k in w.keys:
            lst = self._waiters.get(k)
            if lst is not None:
                lst[:] = [x for x in lst if x is not w]
                if not lst:
                    del self._waiters[k]

    def _complete(self, w: _Waiter) -> None:
        w.done = True
        conn = w.conn
        conn.waiter = None
        conn.blocked = False
        self._send(conn, wire.OK, wire.blobs(*(self._data.get(k) for k in w.keys)))
        if conn.inbuf:
            self._process(conn)

    def _push_deadline(self, deadline: float, w: _Waiter) -> None:
        self._seq += 1
        heapq.heappush(self._deadlines, (deadline, self._seq, w))

    def _expire(self) -> None:
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, w = heapq.heappop(self._deadlines)
            if w.done:
                continue
            conn = w.conn
            if not w.keys:  # handshake deadline
                w.done = True
                if not conn.authed and conn.sock.fileno() >= 0:
                    self._refuse(conn, "no authentication within "
                                       f"{self.HANDSHAKE_TIMEOUT_S:.0f} s")
                continue
            missing = [k.decode(errors="replace") for k in w.keys if k not in self._data]
            self._retire(w)
            conn.blocked = False
            self._send(conn, wire.TIMEOUT, f"timed out waiting for keys {missing}".encode())
            if conn.inbuf:
                self._process(conn)
