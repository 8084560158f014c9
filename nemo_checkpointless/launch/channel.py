"""The local channel between a node agent and one of its rank processes.

A Unix socket pair created by the agent; the rank finds its end in ``NCL_AGENT_FD``.
Messages are JSON objects, one per line:

rank -> agent: ``{"t": "hb"}`` heartbeat (from the rank's monitor thread),
               ``{"t": "step", "step": N}`` progress.
agent -> rank: ``{"t": "gen", "gen": G}`` the job moved to generation G (abort, re-form),
               ``{"t": "assign", "rank": R, "local_rank": L, "gen": G}`` a spare takes rank R.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from typing import Any, Optional

ENV_FD = "NCL_AGENT_FD"


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

    def send(self, message: dict[str, Any]) -> bool:
        data = (json.dumps(message) + "\n").encode()
        with self._send_lock:
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                return False

    def recv(self, timeout: Optional[float] = None) -> Optional[list[dict[str, Any]]]:
        """Messages available within ``timeout``; [] on timeout; None when the peer closed."""
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

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
