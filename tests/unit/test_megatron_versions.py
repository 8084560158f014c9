"""The megatron-core start-up check and version-dependent surfaces, on whichever release the
lane installs (0.16.1 in `make test`, 0.19.2 in `make test-latest`)."""

from __future__ import annotations

import inspect
import os
from types import SimpleNamespace

import pytest

from nemo_checkpointless.compat import megatron_versions as mv


def test_the_installed_release_is_supported_and_has_every_surface():
    version = mv.check_megatron_core()
    assert ".".join(version.split(".")[:2]) in mv.SUPPORTED
    assert mv.missing_surfaces() == []


def test_a_missing_surface_names_it_and_the_supported_releases(monkeypatch):
    monkeypatch.setattr(mv, "_PROBES", [("a surface that is gone",
                                         mv._attr("megatron.core", "no_such_name"))])
    with pytest.raises(RuntimeError, match="lacks what nemo-checkpointless needs \\(a surface "
                                           "that is gone\\).*0.15 to 0.19"):
        mv.check_megatron_core()


def test_the_tokenizer_base_is_found_on_this_release():
    from nemo_checkpointless.data.tokenizer import _MegatronTokenizer

    base = mv.legacy_tokenizer_base()
    assert isinstance(base, type) and _MegatronTokenizer is base


def test_cached_collective_answers_are_forgotten_on_every_chained_optimizer():
    inner = [SimpleNamespace(_has_grad_norm_group_cache=True),
             SimpleNamespace(_has_grad_norm_group_cache=None), SimpleNamespace()]
    chained = SimpleNamespace(chained_optimizers=inner, _has_grad_norm_group_cache=False)
    assert mv.forget_collective_caches(chained) == 2
    assert chained._has_grad_norm_group_cache is None
    assert all(getattr(o, "_has_grad_norm_group_cache", None) is None for o in inner)
    assert mv.forget_collective_caches(chained) == 0


def test_a_rank_starting_on_an_unsupported_release_exits_2_with_the_fix(monkeypatch, capsys):
    from nemo_checkpointless.runtime import require_supported_megatron

    monkeypatch.delenv("NCL_SPARE", raising=False)
    monkeypatch.delenv("NCL_REPLACEMENT", raising=False)
    monkeypatch.setattr(mv, "missing_surfaces", lambda: ["a surface this test removed"])
    with pytest.raises(SystemExit) as exit_:
        require_supported_megatron()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "a surface this test removed" in err and "pip install" in err
    monkeypatch.setenv("NCL_REPLACEMENT", "1")  # a replacement: the first ranks checked it
    require_supported_megatron()


def test_the_dataset_cache_is_named_without_building_or_writing_it(tmp_path):
    import numpy
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.core.datasets.utils import Split

    from nemo_checkpointless import data
    from nemo_checkpointless.data.dataset import _cache_files, make_gpt_config

    tokenizer = data.load_tokenizer()
    prefix = data.ensure_indexed_dataset(str(tmp_path / "corpus"))
    cache = tmp_path / "cache"
    cache.mkdir()
    config = make_gpt_config(prefix, 32, 7, str(cache), tokenizer)
    indexed = GPTDataset.build_low_level_dataset(prefix, config)
    sequences = numpy.arange(GPTDataset.numel_low_level_dataset(indexed), dtype=numpy.int32)
    probe, told = mv.dataset_cache_probe(GPTDataset, config, indexed, prefix, sequences, 100,
                                         Split.train)
    assert list(cache.iterdir()) == []  # 0.15's constructor alone would have written the cache
    files = _cache_files(probe, str(cache))
    # told where the release defers its index loads (0.16+), else found after the build
    assert told in (None, files["document_index"])
    dataset = data.build_gpt_dataset(prefix, 32, 100, 7, str(cache), tokenizer)
    assert dataset.unique_description_hash == probe.unique_description_hash
    assert all(os.path.isfile(f) for f in files.values())
    assert dataset.document_index.filename == files["document_index"]


def test_dp_reshardable_buckets_take_torch_adams_step_on_every_release():
    """0.15 fails its shape assertion on Adam's 0-dim per-parameter step (every durable save
    and load without TE/Apex); the adaptation applies exactly there."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from nemo_checkpointless.compat import megatron_checkpoint as mc

    original = inspect.unwrap(DistributedOptimizer.sharded_param_state_dp_reshardable)
    before = mc._buckets_take_steps(original)
    assert before is not None, "the probe's stand-in optimizer no longer fits this release"
    assert mc.adapt_dp_reshardable_steps() is (not before)
    assert mc._buckets_take_steps(DistributedOptimizer.sharded_param_state_dp_reshardable)
    assert mc.adapt_dp_reshardable_steps() is (not before)  # idempotent


def test_every_supported_series_has_a_pinned_release_that_runs():
    """Each declared series is run: by CI (requirements/pins.txt, latest.txt) or by
    `make test-megatron MCORE=<release>` (requirements/mcore-<release>.txt)."""
    from pathlib import Path

    requirements = Path(__file__).resolve().parents[2] / "requirements"
    pinned = {"0.16.1": requirements / "pins.txt", "0.19.2": requirements / "latest.txt"}
    assert set(mv.TESTED) == set(pinned)
    for release, python in mv.RUN_BY_HAND.items():
        text = (requirements / f"mcore-{release}.txt").read_text()
        assert f"# python: {python.split()[-1]}\n" in text
        pinned[release] = requirements / f"mcore-{release}.txt"
    for release, path in pinned.items():
        assert f"\nmegatron-core=={release}\n" in path.read_text(), path
    assert sorted({".".join(r.split(".")[:2]) for r in pinned}) == sorted(mv.SUPPORTED)
