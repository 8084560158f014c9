"""Whole-node loss seen by the other agents in seconds, without a standby (launch/peers.py).

Two agents (two "nodes" of two ranks each) on this machine; node 1 is killed whole (agent,
ranks, spare). Agent 0's peer watch finds node 1's store server gone and declares node 1's
ranks lost (a new generation) before anything replaces the node; only then does the
scheduler's stand-in start a new agent for node 1. The job ends bit for bit equal to the
fault-free run.
"""

from __future__ import annotations

import re
import time

import pytest

from conftest import Agents
from test_recovery import BASE, LAYOUTS, assert_exact, reference  # noqa: F401

pytestmark = [pytest.mark.timeout(600)]

DECLARED = re.compile(r"\[([\d\- :,]+)\] \[agent 0\] WARNING: node 1 lost: its store server "
                      r"unreachable for ([\d.]+)s; declared by the peer watch of agent:\S+ at "
                      r"generation (\d+)")


def wait_for(agents: Agents, pattern: re.Pattern, timeout: float = 60) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for log in agents.logs:
            found = pattern.search(log.read_text()) if log.exists() else None
            if found:
                return found
        time.sleep(0.1)
    raise TimeoutError(f"{pattern.pattern!r} not in the agents' logs")


def test_peers_declare_a_lost_node_before_its_replacement(tmp_path, reference):
    agents = Agents(2, 2, [*BASE, *LAYOUTS["dp4"]], tmp_path / "run")
    agents.start(0)
    agents.start(1)
    agents.wait_for_step(3)
    killed_at = time.time()
    agents.kill_node(1)
    declared = wait_for(agents, DECLARED)
    seen_after = time.time() - killed_at
    assert 1.0 <= float(declared.group(2)) < 5.0  # --lost-after 1 s, probed 5x a second
    assert seen_after < 15.0, seen_after
    agents.start(1)  # the scheduler's replacement comes only now
    result = agents.wait(timeout=400)
    assert_exact(result, reference("dp4"))
    assert "rejoins the job as a replacement" in result.output
    gen = int(declared.group(3))
    assert re.search(rf"node 1 rejoins the job as a replacement at generation {gen + 1}\b",
                     result.output), result.output[-4000:]
    # one declaration for this loss, although the node stayed down for several probes
    assert len(DECLARED.findall(result.output)) == 1
