"""The agent-rank messages (launch/protocol.py) over a real channel, and the rank's link."""

from __future__ import annotations

import time

import pytest

from nemo_checkpointless.launch import protocol as p
from nemo_checkpointless.launch.channel import Channel
from nemo_checkpointless.recovery.link import AgentLink

EVERY = [p.Hello(recovery=True, progress=False), p.Heartbeat(), p.Step(step=7),
         p.Pause(reason="validation"), p.Unwound(gen=3), p.Done(), p.Fatal(reason="no replica"),
         p.DeviceError(reason="illegal address"), p.Gen(gen=5),
         p.Assign(rank=3, local_rank=1, gen=2, node_rank=1)]


def test_every_kind_round_trips_through_a_channel():
    agent, theirs = Channel.pair()
    rank = Channel(theirs)
    try:
        for msg in EVERY:
            assert rank.send(msg)
        got: list = []
        deadline = time.monotonic() + 5
        while len(got) < len(EVERY) and time.monotonic() < deadline:
            got += agent.receive(timeout=1) or []
        assert got == EVERY
    finally:
        agent.close()
        rank.close()


def test_wire_form_is_stable():
    """What older ranks (plain dicts) send still decodes; the kind names are the wire's."""
    assert p.encode(p.Step(step=4)) == {"t": "step", "step": 4}
    assert p.decode({"t": "hello", "recovery": True}) == p.Hello(recovery=True)
    assert p.decode({"t": "hello", "recovery": True}).reports_progress
    assert not p.decode({"t": "hello", "recovery": False}).reports_progress
    assert not p.Hello(recovery=True, progress=False).reports_progress
    assert p.decode({"t": "assign", "rank": 2, "local_rank": 0, "gen": "3"}) == \
        p.Assign(rank=2, local_rank=0, gen=3)
    assert p.decode({"t": "gen", "gen": 1, "later": "ignored"}) == p.Gen(gen=1)


def test_bad_messages_are_refused():
    with pytest.raises(p.ProtocolError, match="unknown message kind 'nope'"):
        p.decode({"t": "nope"})
    with pytest.raises(p.ProtocolError, match="step message without 'step'"):
        p.decode({"t": "step"})
    with pytest.raises(p.ProtocolError, match="bad value"):
        p.decode({"t": "gen", "gen": "x"})
    with pytest.raises(p.ProtocolError):
        p.encode({"t": "step", "step": 1})  # type: ignore[arg-type]


def test_receive_skips_unknown_kinds():
    agent, theirs = Channel.pair()
    rank = Channel(theirs)
    try:
        rank.send({"t": "from-the-future"})
        rank.send(p.Done())
        assert agent.receive(timeout=2) == [p.Done()]
    finally:
        agent.close()
        rank.close()


def test_link_sends_progress_pause_unwound_and_reads_notices():
    agent, theirs = Channel.pair()
    aborted: list[int] = []
    link = AgentLink(Channel(theirs), on_new_generation=aborted.append, interval=0.05,
                     stuck_after=60).start()
    try:
        link.activate(0)
        link.progress(1)
        link.pause("finish")
        agent.send(p.Gen(gen=1))
        assert link.wait_newer(0, timeout=5) == 1
        deadline = time.monotonic() + 5
        while not aborted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert aborted == [1]  # the abort ran on the link thread
        link.unwound()
        agent.send(p.Assign(rank=2, local_rank=0, gen=2))
        assert link.wait_assignment(timeout=5) == {"t": "assign", "rank": 2, "local_rank": 0,
                                                   "gen": 2, "node_rank": None}
        got: list = []
        deadline = time.monotonic() + 5
        while p.Unwound(gen=1) not in got and time.monotonic() < deadline:
            got += agent.receive(timeout=0.5) or []
        kinds = [m for m in got if not isinstance(m, p.Heartbeat)]
        assert kinds == [p.Unwound(gen=0),  # activate: joined generation 0
                         p.Step(step=1), p.Pause(reason="finish"), p.Unwound(gen=1)]
        assert any(isinstance(m, p.Heartbeat) for m in got)
    finally:
        agent.close()
    deadline = time.monotonic() + 5
    while not link.closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert link.closed


RANK_HOLDING_THE_GIL = """
import ctypes, time
from nemo_checkpointless.launch.channel import Channel
from nemo_checkpointless.recovery.link import AgentLink

link = AgentLink(Channel.from_env(), on_new_generation=lambda gen: None, interval=0.05).start()
time.sleep(0.5)
link.progress(1)
ctypes.PyDLL(None).usleep(2_500_000)  # a C call that keeps the GIL
link.progress(2)
time.sleep(2.5)  # releases the GIL
link.progress(3)
"""


def test_a_c_call_holding_the_gil_silences_the_heartbeat(tmp_path):
    """Why heartbeats cannot judge hangs: the thread that sends them stops while a C call
    holds the GIL (and goes on through a wait that releases it)."""
    import os
    import subprocess
    import sys

    agent, theirs = Channel.pair()
    env = dict(os.environ, NCL_AGENT_FD=str(theirs.fileno()))
    proc = subprocess.Popen([sys.executable, "-c", RANK_HOLDING_THE_GIL], env=env,
                            pass_fds=(theirs.fileno(),))
    theirs.close()
    arrivals: list[tuple[float, object]] = []
    try:
        while True:
            msgs = agent.receive(timeout=20)
            if msgs is None:
                break
            now = time.monotonic()
            arrivals += [(now, m) for m in msgs]
    finally:
        proc.wait(timeout=30)
        agent.close()
    marks = {m.step: t for t, m in arrivals if isinstance(m, p.Step)}
    beats = [t for t, m in arrivals if isinstance(m, p.Heartbeat)]

    def longest_gap(start: float, end: float) -> float:
        inside = [start, *[t for t in beats if start < t < end], end]
        return max(b - a for a, b in zip(inside, inside[1:]))

    assert longest_gap(marks[1], marks[2]) >= 2.0  # held: no heartbeat
    assert longest_gap(marks[2], marks[3]) < 1.0  # released: heartbeats every 0.05 s
