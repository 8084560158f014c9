"""Megatron-Bridge recipes with checkpointless recovery (needs the latest stack: Python 3.12,
megatron-core 0.17+, megatron-bridge; ``make venv-latest``).

Importing this package does not import Bridge; each name below is loaded on first use.

    from megatron.bridge.recipes.llama import llama3_70b_pretrain_config
    from nemo_checkpointless.bridge import apply_checkpointless, run

    cfg = apply_checkpointless(llama3_70b_pretrain_config(), tier="tier4", world_size=64)
    run(cfg, run_dir="/runs/70b")  # ncl-launch: recovered in process; torchrun: Bridge alone

See docs/bridge.md.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "apply_checkpointless": "apply",
    "apply_overrides": "apply",
    "check_bridge_layout": "apply",
    "BridgeCheckpointless": "apply",
    "build_recipe": "recipes",
    "tiny_llama_pretrain_config": "recipes",
    "use_shipped_configs": "recipes",
    "run": "run",
    "run_bridge": "run",
    "run_bridge_under_agent": "run",
    "BridgeStepDriver": "driver",
    "RecordingForwardStep": "steps",
    "MetricsCallback": "steps",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
