"""The environment ``ncl-launch`` needs to start NeMo ranks and spares warm.

``ncl-launch`` forks ranks and spares from a *zygote* that imported the job's modules once
(``launch/zygote.py``). For a NeMo job those are NeMo's and Lightning's (about a minute of
imports on a busy CPU). Two settings make that work:

* ``NCL_ZYGOTE_PRELOAD``: the modules the zygote imports (NeMo's LLM collection, Lightning,
  NeMo-Run, this package's NeMo front-end), so a rank or a warm spare starts with them;
* ``JE_ARROW_MALLOC_CONF=background_thread:false``: pyarrow (imported by Lightning) starts a
  jemalloc background thread otherwise, and the agent refuses to fork a zygote that runs
  threads (it then starts every process with ``exec``, each importing NeMo again).

``recipes/nemo_pretrain.py``'s documentation, the NeMo-Run launcher
(:class:`~nemo_checkpointless.nemo.launcher.NclLaunch`) and the tests use :data:`AGENT_ENV`.
"""

from __future__ import annotations

PRELOAD = (
    "torch", "torch.distributed", "numpy", "megatron.core", "megatron.core.optimizer",
    "lightning.pytorch", "nemo_run", "nemo.lightning", "nemo.collections.llm",
    "nemo_checkpointless.recovery.generation", "nemo_checkpointless.nemo.session",
    "nemo_checkpointless.nemo.strategy", "nemo_checkpointless.nemo.recipe",
    "nemo_checkpointless.nemo.tiny_llama", "nemo_checkpointless.nemo.run",
)

AGENT_ENV = {
    "NCL_ZYGOTE_PRELOAD": ",".join(PRELOAD),
    "JE_ARROW_MALLOC_CONF": "background_thread:false",
}
