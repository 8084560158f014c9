"""Model placement without a GPU: CPU rehearsal keeps the local spec; the TE spec is
refused with a clear message where Transformer Engine does not import."""

from __future__ import annotations

import pytest

from nemo_checkpointless import device
from nemo_checkpointless.config import compose
from nemo_checkpointless.megatron.model import layer_spec, te_available


def test_rehearsal_uses_the_local_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    model = compose([]).model
    assert device.current() == device.HOST
    auto = layer_spec(model)
    local = get_gpt_layer_local_spec(normalization=model.normalization)
    assert repr(auto) == repr(local)
    with pytest.raises(ValueError, match="choose one of auto, transformer_engine, local"):
        layer_spec(model, "fast")
    if not te_available():
        with pytest.raises(RuntimeError, match="Transformer Engine is not importable"):
            layer_spec(model, "transformer_engine")
