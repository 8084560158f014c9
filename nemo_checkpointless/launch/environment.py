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
    """torch/NCCL settings for abort-based in-process recovery on GPU ranks
    (:func:`nemo_checkpointless.gpu.env.nccl_env_defaults`: each one's reason is written
    there), with torch's watchdog timers outlasting this job's recovery timeout."""
    from ..gpu.env import nccl_env_defaults

    return nccl_env_defaults(recovery_budget_s=timeouts.recovery_s + 60)


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
