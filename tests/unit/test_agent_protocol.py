"""The agent acting on what ranks tell it (launch/supervisor.py): a fatal verdict stops the
job with its reason; a device error hands the rank on only after the GPU probe passed, and
a failed probe takes the node out (exit code 5). Fake ranks speak the real protocol to a
real ``ncl-launch``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nemo_checkpointless.comm.world import free_port
from nemo_checkpointless.launch import protocol

pytestmark = pytest.mark.timeout(180)

# rank 1 fails as MODE says once; a spare that takes its place finishes
FAKE_RANK = textwrap.dedent("""
    import os, sys, time
    from nemo_checkpointless.launch import protocol as p
    from nemo_checkpointless.launch.channel import Channel

    ch = Channel.from_env()
    ch.send(p.Hello(recovery=True))
    mode = sys.argv[2]
    if os.environ.get("NCL_SPARE") == "1":
        while True:
            msgs = ch.receive(timeout=60)
            if msgs is None:
                sys.exit(0)
            got = [m for m in msgs if isinstance(m, p.Assign)]
            if got:
                rank = got[0].rank
                break
        open(os.path.join(sys.argv[1], f"spare-took-{rank}"), "w").close()
    else:
        rank = int(os.environ["RANK"])
        if rank == 1 and mode == "device":
            from nemo_checkpointless.recovery.link import AgentLink

            link = AgentLink(ch, on_new_generation=lambda gen: None).start()
            link.exit_device_error("CUDA error: an illegal memory access")
        if rank == 1 and mode == "fatal":
            ch.send(p.Fatal(reason="rank 1 lost optimizer shard and no healthy rank holds it"))
            time.sleep(0.2)
            os._exit(p.EXIT_UNRECOVERABLE)
        time.sleep(1.5)
    ch.send(p.Step(step=1))
    ch.send(p.Done())
""")


def run_agent(tmp_path: Path, mode: str, *extra: str) -> tuple[int, str]:
    script = tmp_path / "fake_rank.py"
    script.write_text(FAKE_RANK)
    env = dict(os.environ, NCL_ZYGOTE_PRELOAD="json", PYTHONUNBUFFERED="1")
    for key in ("NCL_SPAWN", "NCL_JOB_SECRET", "NCL_GPU_PROBE"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "nemo_checkpointless.launch.agent", "--nproc-per-node", "2",
           "--spares", "1", "--master-port", str(free_port()), *extra, str(script),
           str(tmp_path), mode]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return proc.returncode, out


def test_fatal_is_read_and_stops_the_job_with_its_reason(tmp_path):
    code, out = run_agent(tmp_path, "fatal")
    assert code == protocol.EXIT_UNRECOVERABLE, out
    assert ("rank 1 reports that the job cannot recover: rank 1 lost optimizer shard and no "
            "healthy rank holds it") in out
    assert "stopping the job" in out and "replacing it" not in out
    assert not list(tmp_path.glob("spare-took-*"))


def test_device_error_with_a_failing_gpu_probe_takes_the_node_out(tmp_path):
    code, out = run_agent(tmp_path, "device", "--gpu-probe",
                          "echo 'GPU {device}: 4 uncorrected ECC errors'; exit 1")
    assert code == protocol.EXIT_NODE_UNHEALTHY, out
    assert "rank 1 reports a device error: CUDA error: an illegal memory access" in out
    assert "GPU 1 failed its health probe after rank 1's device error" in out
    assert "GPU 1: 4 uncorrected ECC errors" in out
    assert f"(exit code {protocol.EXIT_NODE_UNHEALTHY})" in out
    assert not list(tmp_path.glob("spare-took-*")), "no work may go to the failed GPU"


def test_device_error_with_a_healthy_gpu_goes_to_the_spare(tmp_path):
    code, out = run_agent(tmp_path, "device", "--gpu-probe", "test {device} -eq 1 && echo ok")
    assert code == 0, out
    assert "GPU 1 passed its health probe" in out
    assert "takes rank 1 at generation 1" in out
    assert (tmp_path / "spare-took-1").exists()


def test_device_error_on_a_cpu_host_skips_the_probe(tmp_path):
    code, out = run_agent(tmp_path, "device")
    assert code == 0, out
    assert "no GPU on this host: not probed" in out
    assert (tmp_path / "spare-took-1").exists()
