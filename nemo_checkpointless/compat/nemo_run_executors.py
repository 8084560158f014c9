"""NeMo-Run (0.11) internals the NeMo-Run integration needs: where it lists executor classes.

NeMo-Run picks the scheduler of an executor by the executor's exact class
(``schedulers.api.EXECUTOR_MAPPING``) and decides what an experiment may do (run jobs in
parallel, detach, ...) from tuples of exact classes on ``Experiment``; its executors are
rebuilt from their configuration between ``run.run``'s steps, so a per-instance change does
not survive. :func:`register_like` lists a subclass wherever the class it derives from is.
"""

from __future__ import annotations

CAPABILITIES = ("_PARALLEL_SUPPORTED_EXECUTORS", "_DETACH_SUPPORTED_EXECUTORS",
                "_DEPENDENCY_SUPPORTED_EXECUTORS", "_RUNNER_DEPENDENT_EXECUTORS")


def register_like(cls: type, base: type) -> None:
    """NeMo-Run treats ``cls`` executors as it treats ``base`` ones."""
    from nemo_run.run.experiment import Experiment
    from nemo_run.run.torchx_backend.schedulers import api

    if base not in api.EXECUTOR_MAPPING:
        raise RuntimeError(f"NeMo-Run has no scheduler for {base.__name__}: this NeMo-Run "
                           "version is not supported by nemo_checkpointless")
    api.EXECUTOR_MAPPING.setdefault(cls, api.EXECUTOR_MAPPING[base])
    for name in CAPABILITIES:
        listed = getattr(Experiment, name, ())
        if base in listed and cls not in listed:
            setattr(Experiment, name, (*listed, cls))
