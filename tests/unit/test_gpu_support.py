"""GPU support that runs without a GPU: the health probe's verdicts (here: no device, a
timeout), sticky-error classification, the NCCL environment defaults, and the abort
watchdog that exits a rank whose abort hangs."""

from __future__ import annotations

import subprocess
import sys
import time

from nemo_checkpointless.gpu import env, health


def test_probe_runs_in_a_child_and_says_there_is_no_device_here():
    verdict = health.probe(0, timeout_s=120)
    assert not verdict.healthy and verdict.kind == "no_device", verdict
    assert "no CUDA device 0" in verdict.reason
    assert health.HealthVerdict.from_json(verdict.to_json()) == verdict


def test_a_probe_that_does_not_finish_is_a_failed_gpu():
    verdict = health.probe(0, timeout_s=0.05)
    assert (verdict.healthy, verdict.kind) == (False, "timeout")


def test_cli_prints_one_json_verdict_and_fails_without_a_device():
    proc = subprocess.run([sys.executable, "-m", "nemo_checkpointless.gpu.health",
                           "--device", "3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    verdict = health.HealthVerdict.from_json(proc.stdout.strip().splitlines()[-1])
    assert verdict.local_rank == 3 and verdict.kind == "no_device"


def test_sticky_cuda_errors_are_told_from_recoverable_ones():
    sticky = [RuntimeError("CUDA error: an illegal memory access was encountered"),
              RuntimeError("CUDA error: device-side assert triggered"),
              RuntimeError("CUDA error: uncorrectable ECC error encountered"),
              RuntimeError("CUDA error: unspecified launch failure")]
    recoverable = [RuntimeError("Connection closed by peer [127.0.0.1]:1234"),
                   RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                   RuntimeError("NCCL communicator was aborted on rank 3")]
    assert all(health.poisons_context(e) for e in sticky)
    assert not any(health.poisons_context(e) for e in recoverable)


def test_nccl_defaults_are_overridable_and_outlast_a_recovery():
    defaults = env.nccl_env_defaults()
    assert defaults["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "0"
    assert defaults["TORCH_NCCL_RETHROW_CUDA_ERRORS"] == "0"
    assert defaults["NCCL_NVLS_ENABLE"] == "0"
    assert int(defaults["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]) > env.RECOVERY_BUDGET_S
    mine = {"NCCL_NVLS_ENABLE": "1", "PATH": "/bin"}
    applied = env.apply_defaults(mine)
    assert mine["NCCL_NVLS_ENABLE"] == "1" and "NCCL_NVLS_ENABLE" not in applied
    assert mine["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "0" and mine["PATH"] == "/bin"
    assert env.apply_defaults(mine) == {}


def test_an_abort_that_hangs_exits_the_rank_with_the_gpu_suspect_code():
    code = ("import time\n"
            "from nemo_checkpointless.comm.abort import deadline, job_backend\n"
            "assert job_backend() == 'gloo'\n"
            "with deadline(5.0, 'a quick abort'):\n"
            "    pass\n"
            "with deadline(0.3, 'the test abort'):\n"
            "    time.sleep(60)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == health.EXIT_GPU_SUSPECT, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    assert "the test abort has not returned after 0.3s" in proc.stderr
