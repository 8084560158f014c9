"""The timeouts section (nemo_checkpointless/timeouts.py): precedence, validation, export to
the ranks, and the reference table in docs/launch.md."""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_checkpointless.launch.agent import parse_args
from nemo_checkpointless.launch.environment import child_base_env
from nemo_checkpointless.timeouts import TimeoutConfigError, Timeouts, render_markdown

REPO = Path(__file__).resolve().parents[2]


def test_defaults_and_context_dependent_ones():
    t = Timeouts()
    assert t.store_s == 120 and t.recovery_s == 300 and t.node_lost_after_s == 1
    assert t.pg("gloo") == datetime.timedelta(seconds=60)
    assert t.pg("nccl") == datetime.timedelta(seconds=600)
    assert (t.abort_grace("gloo"), t.abort_grace("nccl")) == (1.0, 0.0)
    assert (t.hang_min(gpu=False), t.hang_min(gpu=True)) == (3.0, 60.0)
    assert (t.hang_initial(gpu=False), t.hang_initial(gpu=True)) == (300.0, 600.0)
    assert t.delta("store_s") == datetime.timedelta(seconds=120)
    with pytest.raises(ValueError, match="accessor"):
        t.delta("pg_s")


def test_flag_over_environment_over_default():
    env = {"NCL_STORE_TIMEOUT_S": "45", "NCL_PG_TIMEOUT_S": "30", "NCL_RECOVERY_TIMEOUT_S": " "}
    t = Timeouts.resolve(flags={"store_s": 10, "recovery_s": None}, env=env)
    assert t.store_s == 10  # flag
    assert t.pg("nccl") == datetime.timedelta(seconds=30)  # environment, for every backend
    assert t.recovery_s == 300  # blank variable: the default


@pytest.mark.parametrize("value,message", [
    ("abc", "NCL_STORE_TIMEOUT_S='abc' is not a number of seconds"),
    ("-1", "must be more than zero"),
    ("0", "must be more than zero"),
    ("nan", "must be more than zero"),
])
def test_bad_values_name_their_source(value, message):
    with pytest.raises(TimeoutConfigError, match=re.escape(message)):
        Timeouts.resolve(env={"NCL_STORE_TIMEOUT_S": value})


def test_zero_is_allowed_where_it_means_none():
    t = Timeouts.resolve(env={"NCL_ABORT_GRACE_S": "0", "NCL_SPARE_REFILL_DELAY_S": "0"})
    assert t.abort_grace("gloo") == 0.0 and t.spare_refill_delay_s == 0.0


def test_unknown_flag_is_a_programming_error():
    with pytest.raises(TypeError, match="unknown timeouts: store"):
        Timeouts.resolve(flags={"store": 3})


def test_agent_flag_reaches_the_ranks(monkeypatch):
    """``ncl-launch --store-timeout 30`` -> the children's environment -> ``from_env``."""
    monkeypatch.setenv("NCL_STORE_TIMEOUT_S", "77")
    monkeypatch.setenv("NCL_HANG_TIMEOUT_S", "9")
    args = parse_args(["--store-timeout", "30", "--lost-after", "2.5", "x.py"])
    assert args.timeouts.store_s == 30 and args.timeouts.hang_s == 9
    env = child_base_env({"PATH": "/bin"}, {"NCL_JOB_ID": "j"}, "j", args.timeouts,
                         gpu=False, allocator_env={})
    assert env["NCL_STORE_TIMEOUT_S"] == "30.0"
    assert "NCL_PG_TIMEOUT_S" not in env  # backend-dependent: the rank decides
    rank_side = Timeouts.from_env(env)
    assert rank_side == args.timeouts
    assert rank_side.node_lost_after_s == 2.5


def test_agent_refuses_a_bad_timeout(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--hang-timeout", "soon", "x.py"])
    assert "--hang-timeout='soon' is not a number of seconds" in capsys.readouterr().err


def test_docs_table_is_the_generated_one():
    """docs/launch.md's table under "Timeouts" is `python -m nemo_checkpointless.timeouts
    --markdown`, verbatim."""
    text = (REPO / "docs" / "launch.md").read_text()
    begin, end = "<!-- timeouts table: begin -->\n", "<!-- timeouts table: end -->"
    assert "## Timeouts" in text and begin in text and end in text
    table = text.split(begin, 1)[1].split(end, 1)[0]
    out = subprocess.run([sys.executable, "-m", "nemo_checkpointless.timeouts", "--markdown"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out == render_markdown()
    assert table == out, ("docs/launch.md is out of date: paste the output of "
                          "`python -m nemo_checkpointless.timeouts --markdown`")
