"""The arguments NeMo 2 passes to megatron-core's ``initialize_model_parallel``.

NeMo builds megatron's parallel state in ``nemo.lightning._strategy_lib.init_model_parallel``
from its ``AppState`` (tensor/pipeline/virtual/context/expert sizes, the rank order
``tp-cp-ep-pp-dp`` of ``use_tp_pp_dp_mapping``, SHARP, optimizer instances, the NCCL
communicator config, gloo side groups...). :func:`recording` runs that call while
capturing exactly the keyword arguments megatron received, so a recovery re-runs
megatron's set-up with the same ones instead of re-deriving a subset.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


@contextlib.contextmanager
def recording(extra: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Within the block, ``parallel_state.initialize_model_parallel`` records its keyword
    arguments into the yielded dict; ``extra`` is added to the call where NeMo leaves the
    argument unset (the package's collective timeout)."""
    from megatron.core import parallel_state as ps

    captured: dict[str, Any] = {}
    original = ps.initialize_model_parallel

    def record(*args: Any, **kwargs: Any) -> Any:
        if args:
            raise RuntimeError("NeMo passed positional arguments to initialize_model_parallel;"
                               " this NeMo version is not supported by nemo_checkpointless")
        for key, value in extra.items():
            kwargs.setdefault(key, value)
        captured.clear()
        captured.update(kwargs)
        return original(**kwargs)

    ps.initialize_model_parallel = record
    try:
        yield captured
    finally:
        ps.initialize_model_parallel = original


def init_model_parallel(model: Any) -> None:
    """NeMo's own set-up of megatron's parallel state (and its ``AppState`` groups)."""
    from nemo.lightning._strategy_lib import init_model_parallel as nemo_init

    nemo_init(model)


def refresh_app_state() -> None:
    """NeMo caches a few groups in ``AppState`` (set by its init): point them at the
    groups megatron holds now."""
    from megatron.core import parallel_state as ps
    from nemo.utils import AppState

    app = AppState()
    app.tensor_model_parallel_group = ps.get_tensor_model_parallel_group()
    app.data_parallel_group = ps.get_data_parallel_group()
    app.data_parallel_rank = ps.get_data_parallel_rank()
    app.data_parallel_size = ps.get_data_parallel_world_size()
    app.pipeline_model_parallel_group = ps.get_pipeline_model_parallel_group()
