"""NeMo 2 adapters: swap checkpointless into a NeMo recipe (needs the ``nemo`` extra).

Importing this package does not import NeMo; each name below is loaded on first use, so
the core environment (no NeMo) can import ``nemo_checkpointless`` and its subpackages.

    from nemo_checkpointless.nemo import apply_checkpointless
    recipe = apply_checkpointless(llm.llama3_8b.pretrain_recipe(), tier="tier4")
"""

from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
