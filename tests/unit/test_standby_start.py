"""A standby listens on its takeover address from its start: a port already in use stops it
at once with a clear error, instead of failing the takeover when the job needs it.

The CI flake behind it (2026-12-03): the standby bound ``--standby-port`` only when it took
a node over, some 20 s after the test had chosen it (bind to port 0: the same odd-numbered
ports every gloo group's listener is given, about a hundred of them in a 4-rank job, more
while a recovery rebuilds its groups), so the bind could fail and no standby took the node
over. The real agent command line; a listener like gloo's holding the port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from nemo_checkpointless.comm.store import JobIdentity, StoreServer

pytestmark = pytest.mark.timeout(120)


def test_a_standby_whose_port_is_taken_stops_at_start_and_says_what_to_do(tmp_path):
    peer = StoreServer("127.0.0.1", 0, JobIdentity.generate("job-standby")).start()
    holder = socket.socket()  # what a gloo group's listener does to a bind on 0.0.0.0
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    env = {**os.environ, "NCL_JOB_SECRET": "s" * 32}
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "nemo_checkpointless.launch.agent", "--nnodes", "1",
             "--nproc-per-node", "1", "--peers", f"127.0.0.1:{peer.port}", "--standby",
             "--standby-host", "127.0.0.3", "--standby-port", str(taken),
             str(tmp_path / "never_run.py")],
            env=env, capture_output=True, text=True, timeout=90)
    finally:
        holder.close()
        peer.stop()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert f"store server cannot listen on 0.0.0.0:{taken}" in out, out
    assert "give another --standby-port" in out, out
    assert "zygote" not in out, out  # nothing was started: the port was tried first
    assert time.monotonic() - started < 60
