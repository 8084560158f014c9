"""The host allocator choice for CPU rehearsal (nemo_checkpointless/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nemo_checkpointless import allocator
from nemo_checkpointless.allocator import Allocator, AllocatorError

INSTALLED = allocator.find("tcmalloc") or allocator.find("jemalloc")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_libraries(monkeypatch, tmp_path):
    """A machine with neither tcmalloc nor jemalloc."""
    monkeypatch.setattr(allocator, "_search_dirs", lambda: [str(tmp_path)])
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)


def test_system_and_gpu_hosts_keep_glibc(monkeypatch):
    assert allocator.choose({"NCL_ALLOCATOR": "system", "NCL_FORCE_CPU": "1"}) is None
    monkeypatch.setattr(allocator, "rehearsal_host", lambda env=None: False)
    assert allocator.choose({}) is None  # auto on a GPU host: nothing changes


def test_auto_on_a_rehearsal_host_prefers_tcmalloc(monkeypatch, tmp_path):
    monkeypatch.setattr(allocator, "_search_dirs", lambda: [str(tmp_path)])
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    assert allocator.choose({"NCL_FORCE_CPU": "1"}) == Allocator(
        "jemalloc", str(tmp_path / "libjemalloc.so.2"))
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert allocator.choose({"NCL_FORCE_CPU": "1"}).name == "tcmalloc"
    assert allocator.choose({"NCL_FORCE_CPU": "1", "NCL_ALLOCATOR": "jemalloc"}).name == "jemalloc"


def test_missing_or_unknown_allocator_says_what_to_do(no_libraries):
    assert allocator.choose({"NCL_FORCE_CPU": "1"}) is None  # auto: glibc, silently
    with pytest.raises(AllocatorError, match="apt-get install libtcmalloc-minimal4.*"
                                             "NCL_ALLOCATOR=system"):
        allocator.choose({"NCL_ALLOCATOR": "tcmalloc"})
    with pytest.raises(AllocatorError, match="not one of auto, tcmalloc, jemalloc, system"):
        allocator.choose({"NCL_ALLOCATOR": "mimalloc"})
    with pytest.raises(AllocatorError, match="no such file"):
        allocator.choose({"NCL_ALLOCATOR": "/nowhere/libtcmalloc.so.4"})


def test_preload_goes_first_once_and_keeps_other_preloads():
    lib = Allocator("tcmalloc", "/usr/lib/libtcmalloc_minimal.so.4")
    env = {"LD_PRELOAD": "/opt/libfoo.so:/usr/lib/libtcmalloc_minimal.so.4"}
    allocator.preload(env, lib)
    assert env["LD_PRELOAD"] == "/usr/lib/libtcmalloc_minimal.so.4 /opt/libfoo.so"
    allocator.preload(env, lib)
    assert env["LD_PRELOAD"] == "/usr/lib/libtcmalloc_minimal.so.4 /opt/libfoo.so"
    empty: dict[str, str] = {}
    allocator.preload(empty, None)
    assert empty == {}


def test_worker_env_marks_the_choice_made(no_libraries):
    assert allocator.worker_env({"NCL_ALLOCATOR": "system"}) == {"NCL_ALLOCATOR_APPLIED": "1"}
    with pytest.raises(AllocatorError):
        allocator.worker_env({"NCL_ALLOCATOR": "bogus"})


PROBE = textwrap.dedent("""
    import os, sys
    from nemo_checkpointless import allocator
    allocator.reexec_if_needed()
    print("pid", os.getpid(), "argv", sys.argv[1:], "loaded", allocator.loaded())
""")


def _probe(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    full = {k: v for k, v in os.environ.items()
            if k not in ("LD_PRELOAD", "NCL_ALLOCATOR", "NCL_ALLOCATOR_APPLIED")}
    full.update(NCL_FORCE_CPU="1", **env)
    return subprocess.run([sys.executable, "-u", str(script), "a", "--b=1"], env=full,
                          capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.skipif(INSTALLED is None, reason="neither tcmalloc nor jemalloc is installed "
                                              "(scripts/install_allocator.sh)")
def test_reexec_preloads_the_allocator_with_the_same_command_line(tmp_path):
    done = _probe(tmp_path)
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    assert words[words.index("argv") + 1:words.index("loaded")] == ["['a',", "'--b=1']"]
    assert "lib" + INSTALLED.name in words[-1]
    system = _probe(tmp_path, NCL_ALLOCATOR="system")
    assert system.stdout.split()[-1] == "None"
    applied = _probe(tmp_path, NCL_ALLOCATOR_APPLIED="1")  # a launcher decided: no re-exec
    assert applied.stdout.split()[-1] == "None"


def test_bad_allocator_stops_the_script_and_the_agent_with_the_reason(tmp_path):
    done = _probe(tmp_path, NCL_ALLOCATOR="bogus")
    assert done.returncode == 1
    assert "NCL_ALLOCATOR='bogus' is not one of" in done.stderr
    env = dict(os.environ, NCL_ALLOCATOR="tcmalloc:oops")
    agent = subprocess.run([sys.executable, "-m", "nemo_checkpointless.launch.agent",
                            "--nproc-per-node", "1", "recipes/pretrain.py"], env=env,
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    assert agent.returncode == 1
    assert "ncl-launch: NCL_ALLOCATOR='tcmalloc:oops' is not one of" in agent.stderr
