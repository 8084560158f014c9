"""NeMo 2 adapters: swap checkpointless into a NeMo recipe (needs the ``nemo`` extra).

Importing this package does not import NeMo; each name below is loaded on first use, so
the core environment (no NeMo) can import ``nemo_checkpointless`` and its subpackages.

    from nemo_checkpointless.nemo import apply_checkpointless
    recipe = apply_checkpointless(llm.llama3_8b.pretrain_recipe(), tier="tier4")
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "apply_checkpointless": "recipe",
    "apply_overrides": "recipe",
    "CheckpointlessMegatronStrategy": "strategy",
    "CheckpointlessCallback": "callbacks",
    "CheckpointlessResume": "resume",
    "CheckpointlessOptimizerModule": "optim",
    "MaskedMockDataModule": "data",
    "pretraining_data": "recipe",
    "run_recipe": "run",
    "NclLaunch": "launcher",
    "NclLocalExecutor": "launcher",
    "ncl_executor": "launcher",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
