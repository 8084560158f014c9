"""The job's key-value store: served by the node agents, used by agents and ranks.

Interface (stable; the implementation behind it may shard keys over several agents):

* :class:`JobIdentity` — job id + per-job secret carried by every connection.
* :class:`StoreServer` — one per agent: ``start()``, ``stop()``, ``port``, ``op_counts()``.
* :func:`connect` — a ``torch.distributed.Store`` client over the agents' endpoints.

This first implementation serves every key from the first endpoint (a TCPStore).
"""

from __future__ import annotations

import datetime
import os
import secrets
from dataclasses import dataclass
from typing import Optional, Sequence

import torch.distributed as dist


@dataclass(frozen=True)
class JobIdentity:
    """Who may join this job's store: the job id and a per-job secret."""

    job_id: str
    secret: str

    @classmethod
    def from_env(cls) -> "JobIdentity":
        job_id = os.environ.get("NCL_JOB_ID")
        secret = os.environ.get("NCL_JOB_SECRET")
        if not job_id or not secret:
            raise RuntimeError(
                "NCL_JOB_ID and NCL_JOB_SECRET are not set: start ranks with ncl-launch "
                "(it sets both), or export them for every rank of the job"
            )
        return cls(job_id, secret)

    @classmethod
    def generate(cls, job_id: Optional[str] = None) -> "JobIdentity":
        return cls(job_id or secrets.token_hex(6), secrets.token_hex(16))

    def env(self) -> dict[str, str]:
        return {"NCL_JOB_ID": self.job_id, "NCL_JOB_SECRET": self.secret}


Endpoint = tuple[str, int]


def parse_endpoints(text: str) -> list[Endpoint]:
    """``host:port,host:port`` -> [(host, port), ...] with a clear error on bad input."""
    out: list[Endpoint] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"bad store endpoint {item!r}: expected host:port")
        out.append((host, int(port)))
    if not out:
        raise ValueError("no store endpoint given: expected host:port[,host:port...]")
    return out


def format_endpoints(endpoints: Sequence[Endpoint]) -> str:
    return ",".join(f"{h}:{p}" for h, p in endpoints)


class StoreServer:
    """A store server run by one node agent."""

    def __init__(self, host: str, port: int, identity: JobIdentity) -> None:
        self.host = host
        self._port = port
        self.identity = identity
        self._store: Optional[dist.TCPStore] = None

    def start(self) -> "StoreServer":
        self._store = dist.TCPStore(self.host, self._port, is_master=True,
                                    wait_for_workers=False, use_libuv=True)
        self._port = self._store.port
        return self

    @property
    def port(self) -> int:
        return self._port

    def op_counts(self) -> dict[str, int]:
        return {}

    def stop(self) -> None:
        self._store = None


def connect(endpoints: Sequence[Endpoint], identity: JobIdentity,
            timeout: datetime.timedelta = datetime.timedelta(seconds=60)) -> dist.Store:
    """A client of the job's store."""
    host, port = endpoints[0]
    return dist.TCPStore(host, port, is_master=False, timeout=timeout, use_libuv=True)
