"""NeMo-Run (0.11) internals the NeMo-Run integration needs: its executor registry.

NeMo-Run picks the scheduler of an executor by the executor's exact class
(``nemo_run.run.torchx_backend.schedulers.api.EXECUTOR_MAPPING``), and its executors
are rebuilt from their configuration between ``run.run``'s steps, so a per-instance
change does not survive. :func:`register_like` registers a subclass under the scheduler
of the class it derives from.
"""

from __future__ import annotations


def register_like(cls: type, base: type) -> None:
    """Schedule ``cls`` executors as NeMo-Run schedules ``base`` ones."""
    from nemo_run.run.torchx_backend.schedulers import api

    if base not in api.EXECUTOR_MAPPING:
        raise RuntimeError(f"NeMo-Run has no scheduler for {base.__name__}: this NeMo-Run "
                           "version is not supported by nemo_checkpointless")
    api.EXECUTOR_MAPPING.setdefault(cls, api.EXECUTOR_MAPPING[base])
