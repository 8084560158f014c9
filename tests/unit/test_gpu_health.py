"""GPU jobs: the torch/NCCL defaults every rank gets, and the health probe that decides
whether a GPU that saw a device error gets more work (launch/environment.py,
launch/gpu_health.py). The probes here are real subprocesses; on this CPU host the default
probe is skipped and a probe command stands in for a failing GPU."""

from __future__ import annotations

import subprocess
import sys

from nemo_checkpointless.launch import gpu_health
from nemo_checkpointless.launch.environment import child_base_env, nccl_defaults
from nemo_checkpointless.timeouts import Timeouts


def test_gpu_jobs_get_recovery_settings_and_the_users_values_win():
    t = Timeouts(recovery_s=400)
    user = {"NCCL_NVLS_ENABLE": "1", "PATH": "/bin"}
    env = child_base_env(user, {}, "job", t, gpu=True, allocator_env={})
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "0"
    assert env["TORCH_NCCL_RETHROW_CUDA_ERRORS"] == "0"
    assert env["NCCL_NVLS_ENABLE"] == "1"  # the user's own value
    # torch's heartbeat outlasts a recovery (timeout + the abort watchdog), 900 s at least
    assert int(env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]) == 2 * (400 + 60) > t.recovery_s
    assert int(nccl_defaults(Timeouts())["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]) == 900
    cpu = child_base_env(user, {}, "job", t, gpu=False, allocator_env={})
    assert not any(k.startswith("TORCH_NCCL") for k in cpu)  # CPU rehearsal: unchanged


def test_no_gpu_no_probe():
    result = gpu_health.probe(0, None, timeout=30, gpu_host=False)
    assert result.ok and result.skipped and "not probed" in result.detail


def test_a_failing_probe_command_fails_with_its_output():
    result = gpu_health.probe(3, "echo 'GPU {device}: 2 uncorrected ECC errors'; exit 1",
                              timeout=30, gpu_host=False)
    assert not result.ok and not result.skipped
    assert "exit code 1" in result.detail and "GPU 3: 2 uncorrected ECC errors" in result.detail


def test_a_probe_that_hangs_fails_at_its_timeout():
    result = gpu_health.probe(0, "echo starting; sleep 30", timeout=1, gpu_host=True)
    assert not result.ok and "did not finish within 1s" in result.detail
    assert result.seconds < 10


def test_a_passing_probe_command_is_healthy():
    result = gpu_health.probe(2, "test {device} -eq 2 && echo fine", timeout=30, gpu_host=True)
    assert result.ok and result.detail == "fine"


def test_the_default_probe_program_fails_without_cuda():
    """The real program, run as the agent runs it: on this host CUDA is absent, so it must
    fail (a GPU host without a working CUDA is not healthy)."""
    result = gpu_health.probe(0, None, timeout=120, gpu_host=True)
    assert not result.ok and "no CUDA device 0" in result.detail
    proc = subprocess.run(gpu_health.command_for(0, None), capture_output=True, text=True)
    assert proc.returncode != 0 and proc.args[:3] == [sys.executable, "-m",
                                                      "nemo_checkpointless.gpu.health"]
