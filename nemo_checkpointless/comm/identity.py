"""Who belongs to a job (job id + secret), where its store lives (endpoints), store errors."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class JobIdentity:
    """Who may join this job's store: the job id and a per-job secret.

    ``mac()``/``verify()`` (HMAC-SHA256 keyed by the secret, bound to the job id) are what
    the store handshake uses; state transfers can use them to admit only this job's peers.
    """

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

    def mac(self, *parts: bytes) -> bytes:
        """HMAC-SHA256 over the job id and ``parts`` (length-prefixed, so unambiguous)."""
        m = hmac.new(self.secret.encode(), self.job_id.encode(), hashlib.sha256)
        for p in parts:
            m.update(struct.pack("<I", len(p)))
            m.update(p)
        return m.digest()

    def verify(self, tag: bytes, *parts: bytes) -> bool:
        return hmac.compare_digest(tag, self.mac(*parts))

    def __repr__(self) -> str:  # never print the secret
        return f"JobIdentity(job_id={self.job_id!r}, secret=<hidden>)"


Endpoint = tuple[str, int]


def parse_endpoints(text: str) -> list[Endpoint]:
    """``host:port,host:port`` -> [(host, port), ...] with a clear error on bad input."""
    out: list[Endpoint] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"bad store endpoint {item!r}: expected host:port")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise ValueError("no store endpoint given: expected host:port[,host:port...]")
    return out


def format_endpoints(endpoints: Sequence[Endpoint]) -> str:
    return ",".join(f"{h}:{p}" for h, p in endpoints)


class StoreError(RuntimeError):
    """A store operation failed (timeout, unreachable server, protocol error)."""


class StoreInterrupted(StoreError):
    """A blocking store operation was interrupted from another thread
    (:meth:`ShardedStore.interrupt`): the job moved on while this thread waited."""


class AdmissionError(StoreError):
    """The server refused our identity, or the server is not of this job."""
