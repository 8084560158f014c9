"""The local channel between a node agent and one of its rank processes.

A Unix socket pair created by the agent; the rank finds its end in ``NCL_AGENT_FD``.
Messages are JSON objects, one per line. What they mean is ``protocol.py``: send a
protocol dataclass (encoded here) and read typed messages with :meth:`Channel.receive`;
:meth:`Channel.send` also takes a plain dict and :meth:`Channel.recv` returns the raw
objects, for tests and callers that speak the wire form directly.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from typing import Any, Optional, Union

from . import protocol
from .protocol import Message

ENV_FD = "NCL_AGENT_FD"

log = logging.getLogger(__name__)


class Channel:
    """Line-delimited JSON over a connected stream socket. Thread-safe sends."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self._send_lock = threading.Lock()

    @classmethod
    def pair(cls) -> tuple["Channel", socket.socket]:
        """(agent side, child-side socket to pass to the child process)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child.set_inheritable(True)
        return cls(parent), child

    @classmethod
    def from_env(cls) -> Optional["Channel"]:
        """The rank's end, when started by ncl-launch; None otherwise."""
        fd = os.environ.get(ENV_FD)
        if fd is None:
            return None
        return cls(socket.socket(fileno=int(fd)))

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: Union[Message, dict[str, Any]]) -> bool:
        """Send one message; False when the peer is gone."""
        obj = message if isinstance(message, dict) else protocol.encode(message)
        data = (json.dumps(obj) + "\n").encode()
        with self._send_lock:
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                return False

    def recv(self, timeout: Optional[float] = None) -> Optional[list[dict[str, Any]]]:
        """Objects available within ``timeout``; [] on timeout; None when the peer closed."""
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(65536)
        except (socket.timeout, BlockingIOError):
            return []
        except OSError:
            return None
        if not chunk:
            return None
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def receive(self, timeout: Optional[float] = None) -> Optional[list[Message]]:
        """Typed messages available within ``timeout``; [] on timeout; None when the peer
        closed. A message of an unknown kind is logged and skipped."""
        objs = self.recv(timeout)
        if objs is None:
            return None
        out = []
        for obj in objs:
            try:
                out.append(protocol.decode(obj))
            except protocol.ProtocolError as err:
                log.warning("agent channel: %s", err)
        return out

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
