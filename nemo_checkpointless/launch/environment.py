"""What every child of an agent finds in its environment: identity, timeouts, torch/NCCL settings.

The agent's own environment is the base (what the user exported). On top of it:

* the job identity and run id, the resolved :class:`~nemo_checkpointless.timeouts.Timeouts`
  (so ``ncl-launch --store-timeout`` reaches the ranks), one OpenMP thread unless the user
  chose otherwise, and the host allocator of CPU rehearsal;
* on GPU hosts, the torch and NCCL settings that in-process recovery needs
  (:func:`nccl_defaults`), each only when the user has not set it: a user's value always
  wins. ``docs/launch.md`` ("torch and NCCL settings") says why each one is there.
"""

from __future__ import annotations

from typing import Mapping

from ..timeouts import Timeouts


def nccl_defaults(timeouts: Timeouts) -> dict[str, str]:
    """torch/NCCL settings for abort-based in-process recovery on GPU ranks.

    * ``TORCH_NCCL_ASYNC_ERROR_HANDLING=0``: torch's default (3) tears the process down
      from the watchdog when a collective fails or times out, which kills every healthy
      rank of a failed peer's groups before the agent's notice arrives; torch documents
      ``_abort_process_group`` (what recovery uses) as meant for this set to 0.
    * ``TORCH_NCCL_RETHROW_CUDA_ERRORS=0``: the watchdog does not rethrow a CUDA error
      (which ends the process from a background thread); the rank sees it on its own
      thread, where recovery classifies it.
    * ``NCCL_NVLS_ENABLE=0``: NVLink SHARP buffers are registered per communicator and
      are not released by an abort; NVIDIA's in-process restart turns NVLS off as well.
    * ``TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC``: torch's monitor thread kills a process whose
      watchdog has not beaten for this long (8 minutes by default); an abort and the wait
      for a replacement can block it for up to a recovery, so twice the recovery timeout
      (and never less than torch's default).
    """
    heartbeat = max(480, int(2 * timeouts.recovery_s))
    return {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "0",
        "TORCH_NCCL_RETHROW_CUDA_ERRORS": "0",
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(heartbeat),
    }


def child_base_env(user_env: Mapping[str, str], identity_env: Mapping[str, str], job_id: str,
                   timeouts: Timeouts, gpu: bool,
                   allocator_env: Mapping[str, str]) -> dict[str, str]:
    """The environment every rank, spare and the zygote start from (per-child settings
    such as RANK come on top)."""
    env = dict(user_env)
    env.update(identity_env)
    env.setdefault("NCL_RUN_ID", job_id)
    env.update(timeouts.to_env())
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    env["PYTHONUNBUFFERED"] = "1"
    if gpu:
        for key, value in nccl_defaults(timeouts).items():
            env.setdefault(key, value)
    env.update(allocator_env)
    return env
