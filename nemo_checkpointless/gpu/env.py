"""The torch and NCCL environment in-process recovery needs on GPUs, as overridable defaults.

    env = dict(os.environ)
    apply_defaults(env)            # the agent, before it starts ranks and spares

Each variable is read by torch or NCCL once, when the first communicator is created, so
it must be in the rank's environment before the process starts. A value the user already
exported is never replaced. Why each one (read in torch 2.13's
``torch/include/torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp`` and
``torch/distributed/distributed_c10d.py``, and NVIDIA's in-process restart guide,
nvidia-resiliency-ext ``docs/source/inprocess/usage_guide.rst``) is written next to it
below and argued in docs/gpu.md.
"""

from __future__ import annotations

from typing import MutableMapping

# Longest a recovery may take before the job gives up: timeouts.recovery_s (300 s by
# default; the agent passes the resolved value) plus the abort watchdog (comm/abort.py, 60 s). torch's own timers
# must be longer, or they kill a healthy rank that is waiting for its peers to recover.
RECOVERY_BUDGET_S = 300 + 60


def nccl_env_defaults(recovery_budget_s: float = RECOVERY_BUDGET_S) -> dict[str, str]:
    """Defaults for a rank on NCCL; each entry's comment says where it is required."""
    heartbeat = int(max(900, 2 * recovery_budget_s))
    return {
        # torch/distributed/distributed_c10d.py, _abort_process_group's docstring: "this
        # API should be used with TORCH_NCCL_ASYNC_ERROR_HANDLING turned off (i.e. set to
        # 0). Otherwise, ProcessGroupNCCL's watchdog may automatically handle errors or
        # timeouts for you including aborting the ProcessGroup." ProcessGroupNCCL.hpp,
        # enum ErrorHandlingMode: the default 3 (SkipCleanUp) tears the process down on
        # any NCCL error or timeout, e.g. the remote error a healthy rank sees when its
        # peer dies; 0 (NoHandling) leaves the failure to the agent and our abort.
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "0",
        # ProcessGroupNCCL.hpp: "Whether to rethrow CUDA Errors in the watchdog (default
        # true)"; usage_guide.rst, Known issues (PyTorch) 4: the watchdog otherwise
        # "forcefully terminates the process if NCCL call returns an error, or if CUDA
        # context was corrupted", which "prevents ... restarting"; workaround: 0.
        "TORCH_NCCL_RETHROW_CUDA_ERRORS": "0",
        # usage_guide.rst, Known issues (NCCL) 1: "Support for NVLink SHARP (NVLS) in NCCL
        # must be disabled by setting the NCCL_NVLS_ENABLE environment variable to 0."
        # (NVLS buffers are multicast objects shared by every rank of a node; an aborted
        # communicator cannot release them while its peers hold them.)
        "NCCL_NVLS_ENABLE": "0",
        # ProcessGroupNCCL.hpp, TORCH_NCCL_ENABLE_MONITORING / HEARTBEAT_TIMEOUT_SEC: the
        # heartbeat monitor "aborts the process when the ProcessGroupNCCL Watchdog thread
        # gets stuck and no heartbeat is detected after TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"
        # (default 480 s). Kept on (a truly stuck watchdog should end the rank) but longer
        # than a recovery, so a watchdog blocked behind an abort is not shot mid-recovery.
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(heartbeat),
        # ProcessGroupNCCL.hpp, TORCH_NCCL_DUMP_ON_TIMEOUT: a flight-recorder dump on a
        # watchdog timeout writes one file per rank and waits
        # TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC before exiting; a failure we recover from
        # is not a reason to stall every rank for a dump.
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
        # torch/cuda/__init__.py, is_available's docstring: it "will NOT poison fork if
        # the environment variable PYTORCH_NVML_BASED_CUDA_CHECK=1 is set" (it asks NVML,
        # not the CUDA driver). ncl-launch forks ranks and spares from a zygote that must
        # not have loaded the CUDA driver (launch/zygote.py refuses to fork one that has).
        "PYTORCH_NVML_BASED_CUDA_CHECK": "1",
    }


def apply_defaults(env: MutableMapping[str, str],
                   recovery_budget_s: float = RECOVERY_BUDGET_S) -> dict[str, str]:
    """Set every default that ``env`` does not already define; returns what was set."""
    applied = {}
    for key, value in nccl_env_defaults(recovery_budget_s).items():
        if key not in env:
            env[key] = value
            applied[key] = value
    return applied
