"""Ranks and spares forked from a warm template process (launch/zygote.py).

A forked child must behave like ``python -u SCRIPT ARGS`` started with Popen (argv,
sys.path[0], environment, working directory, exit codes, kill, the agent channel), die
with its node (killpg) and with its agent, and ``ncl-launch --spawn exec`` must still
start processes the old way. The lifecycle tests preload a light module (json); one test
checks that the real preload list leaves the zygote safe to fork (one thread, no CUDA).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nemo_checkpointless.launch.agent import kill_node
from nemo_checkpointless.launch.channel import Channel
from nemo_checkpointless.launch.zygote import Zygote, ZygoteError, _gone

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import gc, os, sys, time
    from nemo_checkpointless.launch.channel import Channel

    ch = Channel.from_env()
    ch.send({"t": "hello", "argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(),
             "value": os.environ.get("ZYGOTE_TEST"), "gone": os.environ.get("ZYGOTE_GONE"),
             "name": __name__, "frozen": gc.get_freeze_count(),
             "fd": os.environ["NCL_AGENT_FD"], "spare": os.environ.get("NCL_SPARE")})
    mode = sys.argv[1]
    if mode == "echo":
        for msg in ch.recv(timeout=10):
            ch.send({"t": "echo", "got": msg})
    elif mode == "exit":
        sys.exit(7)
    elif mode == "message":
        sys.exit("a message for stderr")
    elif mode == "raise":
        raise ValueError("boom from the script")
    elif mode == "os_exit":
        os._exit(5)
    elif mode == "sleep":
        time.sleep(60)
""")


@pytest.fixture
def child_script(tmp_path: Path) -> Path:
    path = tmp_path / "scripts" / "child.py"
    path.parent.mkdir()
    path.write_text(CHILD)
    return path


@pytest.fixture
def zygote(child_script: Path, tmp_path: Path):
    """A zygote whose stderr (and so its children's) is the file ``tmp_path/stderr``."""
    saved = os.dup(2)
    with open(tmp_path / "stderr", "wb") as err:
        os.dup2(err.fileno(), 2)
        try:
            z = Zygote(str(child_script), dict(os.environ, ZYGOTE_GONE="zygote only"),
                       preload=["json"])
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    z.ready(timeout=60)
    yield z
    z.close()


def spawn(zygote: Zygote, script: Path, mode: str, cwd: Path, **env: str):
    channel, theirs = Channel.pair()
    try:
        proc = zygote.spawn([str(script), mode], dict(os.environ, **env), theirs, cwd=str(cwd))
    finally:
        theirs.close()
    return proc, channel


def hello(channel: Channel) -> dict:
    msgs = channel.recv(timeout=20)
    assert msgs, "no hello from the child"
    return msgs[0]


def test_child_runs_the_script_as_python_would(zygote, child_script, tmp_path):
    proc, channel = spawn(zygote, child_script, "echo", tmp_path, ZYGOTE_TEST="from agent")
    msg = hello(channel)
    assert msg["argv"] == [str(child_script), "echo"]
    assert msg["path0"] == str(child_script.parent)  # as `python SCRIPT` sets it
    assert msg["cwd"] == str(tmp_path)
    assert msg["value"] == "from agent"
    assert msg["gone"] is None  # in the zygote's environment, not in the child's
    assert msg["name"] == "__main__"
    assert int(msg["fd"]) > 2
    assert msg["frozen"] > 1000  # the zygote's objects: full collections here skip them
    channel.send({"t": "gen", "gen": 4})
    assert channel.recv(timeout=10) == [{"t": "echo", "got": {"t": "gen", "gen": 4}}]
    assert proc.wait(timeout=10) == 0
    assert proc.poll() == 0 and proc.returncode == 0
    assert channel.recv(timeout=5) is None  # the child's end closed with it


@pytest.mark.parametrize("mode,code", [("exit", 7), ("message", 1), ("raise", 1),
                                       ("os_exit", 5)])
def test_exit_codes_are_popens(zygote, child_script, tmp_path, mode, code):
    proc, channel = spawn(zygote, child_script, mode, tmp_path)
    hello(channel)
    assert proc.wait(timeout=10) == code
    err = (tmp_path / "stderr").read_text()
    if mode == "raise":  # the traceback starts at the script, as the interpreter prints it
        assert "Traceback (most recent call last):\n  File \"%s\"" % child_script in err
        assert "ValueError: boom from the script" in err
    if mode == "message":
        assert "a message for stderr" in err


def test_kill_poll_and_wait_timeout(zygote, child_script, tmp_path):
    proc, channel = spawn(zygote, child_script, "sleep", tmp_path)
    hello(channel)
    assert proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.3)
    proc.kill()
    assert proc.wait(timeout=10) == -signal.SIGKILL
    proc.kill()  # a second kill of a finished child does nothing
    proc2, channel2 = spawn(zygote, child_script, "sleep", tmp_path)
    hello(channel2)
    proc2.terminate()
    assert proc2.wait(timeout=10) == -signal.SIGTERM


def test_a_failed_spawn_leaves_the_zygote_and_its_children(zygote, child_script, tmp_path):
    """A request the zygote cannot take (here: an environment over the socket's message
    size) fails alone: the agent falls back to exec for new processes while the children
    already forked keep running."""
    proc, channel = spawn(zygote, child_script, "sleep", tmp_path)
    hello(channel)
    with pytest.raises(ZygoteError):
        spawn(zygote, child_script, "sleep", tmp_path, HUGE="x" * (1 << 20))
    assert proc.poll() is None
    proc2, channel2 = spawn(zygote, child_script, "exit", tmp_path)
    hello(channel2)
    assert proc2.wait(timeout=10) == 7
    proc.kill()
    assert proc.wait(timeout=10) == -signal.SIGKILL


def test_zygote_started_threads_is_refused(tmp_path):
    (tmp_path / "threader.py").write_text(
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
    z = Zygote(str(tmp_path / "script.py"), dict(os.environ), preload=["threader"])
    try:
        with pytest.raises(ZygoteError, match="2 threads"):
            z.ready(timeout=60)
    finally:
        z.close()


def test_default_preload_is_fork_safe():
    """The real list (torch, megatron-core, hydra, the training modules): one thread, no
    CUDA driver, nothing missing."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    z = Zygote(str(REPO / "recipes" / "pretrain.py"), env)
    try:
        info = z.ready(timeout=100)
    finally:
        z.close()
    assert info["threads"] == 1 and not info["cuda"]
    assert info["failed"] == []
    assert info["modules"] > 1000


# An agent stand-in in its own session: a zygote and two sleeping children, pids on stdout.
HARNESS = textwrap.dedent("""
    import json, os, sys, time
    from nemo_checkpointless.launch.channel import Channel
    from nemo_checkpointless.launch.zygote import Zygote

    script = sys.argv[1]
    z = Zygote(script, dict(os.environ), preload=["json"])
    z.ready(timeout=60)
    pids, keep = [], []
    for _ in range(2):
        ch, theirs = Channel.pair()
        pids.append(z.spawn([script, "sleep"], dict(os.environ), theirs).pid)
        theirs.close()
        ch.recv(timeout=20)
        keep.append(ch)
    print(json.dumps({"zygote": z.pid, "children": pids}), flush=True)
    time.sleep(120)
""")


def start_harness(child_script: Path):
    proc = subprocess.Popen([sys.executable, "-c", HARNESS, str(child_script)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    pids = json.loads(proc.stdout.readline())
    procs = [pids["zygote"], *pids["children"]]
    assert os.getpgid(pids["zygote"]) == proc.pid  # all in the agent's process group
    assert all(os.getpgid(pid) == proc.pid for pid in pids["children"])
    return proc, procs


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if not _gone(pid)]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


def test_whole_node_killpg_kills_forked_children(child_script):
    proc, pids = start_harness(child_script)
    try:
        kill_node(proc.pid)
        proc.wait(timeout=10)
        assert wait_gone(pids) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_children_die_with_their_agent(child_script):
    """Only the agent is killed: the zygote and every rank forked from it follow."""
    proc, pids = start_harness(child_script)
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert wait_gone(pids) == []
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# A stand-in for recipes/pretrain.py under the agent: ranks say hello; rank 1 fails once
# after its hello; the spare that takes its place finishes it.
FAKE_RANK = textwrap.dedent("""
    import json, os, sys, time
    from nemo_checkpointless.launch.channel import Channel

    ch = Channel.from_env()
    ch.send({"t": "hello", "recovery": True})
    spare = os.environ.get("NCL_SPARE") == "1"
    if spare:
        rank = None
        while rank is None:
            msgs = ch.recv(timeout=60)
            if msgs is None:
                sys.exit(0)
            rank = next((m["rank"] for m in msgs if m.get("t") == "assign"), None)
    else:
        rank = int(os.environ["RANK"])
        if rank == 1:
            time.sleep(0.3)
            sys.exit(1)
    out = os.path.join(sys.argv[1], f"rank{rank}.json")
    with open(out, "w") as f:
        json.dump({"rank": rank, "spare": spare, "pid": os.getpid(), "ppid": os.getppid(),
                   "name": __name__, "path0": sys.path[0], "cwd": os.getcwd()}, f)
    ch.send({"t": "done"})
""")


def run_agent(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, int]:
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return proc.returncode, out, proc.pid


@pytest.mark.parametrize("spawn_mode", ["fork", "exec"])
def test_agent_replaces_a_failed_rank_with_a_spare(spawn_mode, tmp_path):
    from nemo_checkpointless.comm.world import free_port

    script = tmp_path / "fake_rank.py"
    script.write_text(FAKE_RANK)
    env = dict(os.environ, NCL_ZYGOTE_PRELOAD="json", PYTHONUNBUFFERED="1")
    env.pop("NCL_SPAWN", None)
    env.pop("NCL_JOB_SECRET", None)
    mode_args = [] if spawn_mode == "fork" else ["--spawn", "exec"]  # fork is the default
    cmd = [sys.executable, "-m", "nemo_checkpointless.launch.agent", "--nproc-per-node", "2",
           "--spares", "1", "--spare-refill-delay", "0", "--master-port", str(free_port()),
           *mode_args, str(script), str(tmp_path)]
    code, out, agent_pid = run_agent(cmd, env, tmp_path)
    assert code == 0, out
    assert "rank 1 failed (exit code 1): replacing it" in out
    assert "takes rank 1 at generation 1" in out
    forked = re.findall(r"started rank \d+ \(pid \d+\)( forked from the zygote)?", out)
    assert len(forked) == 2 and all(bool(f) == (spawn_mode == "fork") for f in forked)
    assert ("zygote (pid" in out) == (spawn_mode == "fork")
    ranks = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert ranks[1]["spare"] and not ranks[0]["spare"]
    assert all(r["name"] == "__main__" and r["path0"] == os.path.realpath(tmp_path)
               and r["cwd"] == os.path.realpath(tmp_path) for r in ranks.values())
    if spawn_mode == "fork":
        zygote_pid = int(out.split("zygote (pid ")[1].split(")")[0])
        assert all(r["ppid"] == zygote_pid for r in ranks.values())
    else:
        assert all(r["ppid"] == agent_pid for r in ranks.values())


def test_agent_falls_back_to_exec_when_the_zygote_is_unsafe(tmp_path):
    from nemo_checkpointless.comm.world import free_port

    script = tmp_path / "fake_rank.py"
    script.write_text(FAKE_RANK.replace("if rank == 1:", "if False:"))
    (tmp_path / "threader.py").write_text(
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
    env = dict(os.environ, NCL_ZYGOTE_PRELOAD="threader", NCL_SPAWN="fork")
    env.pop("NCL_JOB_SECRET", None)
    cmd = [sys.executable, "-m", "nemo_checkpointless.launch.agent", "--nproc-per-node", "2",
           "--master-port", str(free_port()), str(script), str(tmp_path)]
    code, out, _ = run_agent(cmd, env, tmp_path)
    assert code == 0, out
    assert "forking it is unsafe: starting processes with exec" in out
    assert "started rank 0 (pid" in out and "forked from the zygote" not in out


def test_spawn_flag_is_checked():
    from nemo_checkpointless.launch.agent import parse_args

    assert parse_args(["--spawn", "exec", "x.py"]).spawn == "exec"
    with pytest.raises(SystemExit):
        parse_args(["--spawn", "vfork", "x.py"])
