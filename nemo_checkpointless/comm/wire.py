"""The store's wire protocol, shared by server and client.

A frame is ``<u8 op|status><u32 payload length><payload>``. A payload holds fixed i64
fields first, then blobs as ``<u32 length><bytes>`` (length ``0xFFFFFFFF``: absent key).

Connection: the server sends ``OK, MAGIC + nonce``; the client sends ``AUTH`` with
``[job id, client nonce, HMAC(secret; "client", server nonce, client nonce)]`` and may
pipeline requests behind it; the server answers ``OK, HMAC(secret; "server", client nonce,
server nonce)`` (or ``ERROR`` and closes) and only then serves the requests.
"""

from __future__ import annotations

import datetime
import struct
from typing import Optional

HDR = struct.Struct("<BI")
U32 = struct.Struct("<I")
I64 = struct.Struct("<q")
MAGIC = b"NCLS1"
ABSENT = 0xFFFFFFFF
MAX_FRAME = 256 << 20
MAX_AUTH_FRAME = 4096

(SET, GET, ADD, CAS, WAIT, CHECK, DELETE, NUM_KEYS, MAX_SET, MAX_ADD, PEEK, MULTI_SET,
 APPEND, DELETE_PREFIX, STATS, PING, AUTH, RSET, DUMP, MERGE) = range(1, 21)
OP_NAMES = {SET: "set", GET: "get", ADD: "add", CAS: "compare_set", WAIT: "wait",
            CHECK: "check", DELETE: "delete_key", NUM_KEYS: "num_keys", MAX_SET: "max_set",
            MAX_ADD: "max_add", PEEK: "peek", MULTI_SET: "multi_set", APPEND: "append",
            DELETE_PREFIX: "delete_prefix", STATS: "stats", PING: "ping", AUTH: "auth",
            RSET: "replicated_set", DUMP: "dump_replicated", MERGE: "merge_replicated"}
OK, TIMEOUT, ERROR = 0, 1, 2


def blobs(*items: Optional[bytes]) -> bytes:
    out = []
    for b in items:
        if b is None:
            out.append(U32.pack(ABSENT))
        else:
            out.append(U32.pack(len(b)))
            out.append(b)
    return b"".join(out)


def unblobs(buf: bytes, offset: int = 0) -> list[Optional[bytes]]:
    out: list[Optional[bytes]] = []
    end = len(buf)
    while offset < end:
        (n,) = U32.unpack_from(buf, offset)
        offset += 4
        if n == ABSENT:
            out.append(None)
        else:
            out.append(bytes(buf[offset:offset + n]))
            offset += n
    return out


def merged(current: Optional[bytes], other: bytes) -> bytes:
    """Two copies of a replicated key: the larger integer, else the copy already held."""
    if current is None:
        return other
    try:
        return str(max(int(current), int(other))).encode()
    except ValueError:
        return current


def as_bytes(value) -> bytes:
    """Keys and values as torch hands them over (str, bytes, or a list of byte values)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (list, tuple)):
        return bytes(value)
    return str(value).encode()


def millis(timeout: Optional[datetime.timedelta | float]) -> int:
    """A timeout in milliseconds for the wire (-1: none)."""
    if timeout is None:
        return -1
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    return max(0, int(timeout * 1000))
