"""The agent's limits on repeated failures (nemo_checkpointless/launch/limits.py and
start_failures.py): precedence, validation, the count's rules, and the reference table in
docs/launch.md. The limit acting on a real job: tests/e2e/test_job_edges.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nemo_checkpointless.launch.agent import parse_args
from nemo_checkpointless.launch.limits import AgentLimits, LimitConfigError, render_markdown
from nemo_checkpointless.launch.start_failures import StartFailures

REPO = Path(__file__).resolve().parents[2]


def test_flag_over_environment_over_default():
    assert AgentLimits().max_start_failures == 3
    assert AgentLimits.resolve(env={"NCL_MAX_START_FAILURES": "5"}).max_start_failures == 5
    assert AgentLimits.resolve({"max_start_failures": "2"},
                               env={"NCL_MAX_START_FAILURES": "5"}).max_start_failures == 2
    assert parse_args(["--max-start-failures", "0", "x.py"]).limits.max_start_failures == 0


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_a_bad_limit_is_refused_with_its_source(value, capsys):
    with pytest.raises(LimitConfigError, match="NCL_MAX_START_FAILURES"):
        AgentLimits.resolve(env={"NCL_MAX_START_FAILURES": value})
    with pytest.raises(SystemExit):
        parse_args(["--max-start-failures", value, "x.py"])
    assert "--max-start-failures" in capsys.readouterr().err


def test_only_deaths_in_a_row_before_a_step_count():
    sf = StartFailures(limit=3)
    assert not sf.record(3, 100, "exit code -9", stepped=True)  # it had trained: not counted
    assert not sf.record(3, 101, "exit code 1", stepped=False)
    assert not sf.record(3, 102, "exit code 1", stepped=False)
    assert not sf.record(2, 103, "exit code 1", stepped=False)  # another rank: its own count
    assert sf.count(3) == 2 and sf.count(2) == 1
    assert not sf.record(3, 104, "exit code -9", stepped=True)  # a step in between: cleared
    assert sf.count(3) == 0
    for pid in (105, 106):
        assert not sf.record(3, pid, "exit code 1", stepped=False)
    assert sf.record(3, 107, "hung: no progress", stepped=False)
    message = sf.message(3)
    assert message.startswith("rank 3 failed 3 times in a row before completing a step (pid "
                              "105: exit code 1; pid 106: exit code 1; pid 107: hung: no "
                              "progress): not starting another process for it "
                              "(--max-start-failures 3)")
    assert "lines tagged [rank 3]" in message


def test_zero_is_no_limit():
    sf = StartFailures(limit=0)
    assert not any(sf.record(1, pid, "exit code 1", stepped=False) for pid in range(50))


def test_docs_table_is_the_generated_one():
    text = (REPO / "docs" / "launch.md").read_text()
    begin, end = "<!-- limits table: begin -->\n", "<!-- limits table: end -->"
    assert "## Limits on repeated failures" in text and begin in text and end in text
    table = text.split(begin, 1)[1].split(end, 1)[0]
    out = subprocess.run([sys.executable, "-m", "nemo_checkpointless.launch.limits",
                          "--markdown"], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout
    assert out == render_markdown()
    assert table == out, ("docs/launch.md is out of date: paste the output of "
                          "`python -m nemo_checkpointless.launch.limits --markdown`")
