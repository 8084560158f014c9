"""Megatron-core ``GPTDataset`` over an indexed dataset, with or without ``torch.distributed``.

Megatron's ``BlendedMegatronDatasetBuilder`` coordinates ranks with process-group barriers,
and ``GPTDataset`` itself, when no process group exists, lets every process write the
index cache (document / sample / shuffle indices) non-atomically into the same files.
Here the ``GPTDataset`` is built directly and the cache under ``cache_dir`` is made safe
for any number of processes calling :func:`build_gpt_dataset` at once, no process group
needed:

* builders serialise on a file lock in ``cache_dir`` (the first builds, the rest wait);
* the indices are computed in memory by Megatron itself (``path_to_cache=""``, which also
  sidesteps its rank-0-only build when a process group does exist), saved into a private
  directory and published with atomic renames, the description file last. Megatron only
  treats the cache as present when all four files exist, so a crash mid-publish leaves a
  cache miss, never a torn cache;
* every process then opens the published indices (read-only mmaps), so all of them see
  exactly the same samples.
"""

from __future__ import annotations

import os

import numpy
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from nemo_checkpointless.compat.megatron_versions import dataset_cache_probe
from nemo_checkpointless.data._fs import file_lock, private_tmp_dir
from nemo_checkpointless.data._logging import quiet_logger
from nemo_checkpointless.data.tokenizer import BPETokenizer

_LOCK_NAME = ".gpt_dataset_indices.lock"


def make_gpt_config(
    prefix: str, seq_length: int, seed: int, cache_dir: str, tokenizer: BPETokenizer
) -> GPTDatasetConfig:
    """The ``GPTDatasetConfig`` used by :func:`build_gpt_dataset` (all-train split, no masks)."""
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None),
        split="1,0,0",
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )


def _cache_files(dataset: GPTDataset, cache_dir: str) -> dict[str, str]:
    """The index cache files of ``dataset`` in ``cache_dir``, named as GPTDataset names them."""
    base = f"{dataset.unique_description_hash}-{type(dataset).__name__}-{dataset.index_split.name}"
    affixes = ("document_index", "sample_index", "shuffle_index")
    files = {name: os.path.join(cache_dir, f"{base}-{name}.npy") for name in affixes}
    files["description"] = os.path.join(cache_dir, f"{base}-description.txt")
    return files


def _save_and_publish(dataset: GPTDataset, tmp_dir: str, cache_dir: str) -> None:
    """Save in-memory indices the way GPTDataset does, then rename them into ``cache_dir``."""
    staged = _cache_files(dataset, tmp_dir)
    for name in ("document_index", "sample_index", "shuffle_index"):
        numpy.save(staged[name], getattr(dataset, name), allow_pickle=True)
    with open(staged["description"], "wt") as f:
        f.write(dataset.unique_description)
    final = _cache_files(dataset, cache_dir)
    for name in ("document_index", "sample_index", "shuffle_index", "description"):
        with open(staged[name], "rb") as f:
            os.fsync(f.fileno())
        os.replace(staged[name], final[name])


def build_gpt_dataset(
    prefix: str,
    seq_length: int,
    num_samples: int,
    seed: int,
    cache_dir: str,
    tokenizer: BPETokenizer,
) -> GPTDataset:
    """Build Megatron's ``GPTDataset`` over the indexed dataset at ``prefix``.

    ``dataset[i]`` returns ``{"tokens", "labels", "loss_mask", "position_ids"}``, each of
    length ``seq_length``: Megatron draws ``seq_length + 1`` consecutive tokens and
    ``labels`` are ``tokens`` shifted left by one. Documents are concatenated (each ends
    with EOD) and cut into samples, shuffled deterministically from ``seed``. If the corpus
    holds fewer than ``num_samples * seq_length + 1`` tokens, Megatron goes through it
    again (reshuffled per epoch), so ``len(dataset) >= num_samples`` (whole epochs).

    Args:
        prefix: path prefix of the ``.bin``/``.idx`` files (see ``ensure_indexed_dataset``).
        seq_length: tokens per sample.
        num_samples: minimum number of samples to expose.
        seed: random seed of the document and sample shuffles.
        cache_dir: directory of the cached sample indices; created if missing.
        tokenizer: the tokenizer the dataset was built with (its EOD and vocab size).
    """
    if seq_length <= 0 or num_samples <= 0:
        raise ValueError(
            f"seq_length ({seq_length}) and num_samples ({num_samples}) must be positive"
        )
    if not IndexedDataset.exists(prefix):
        raise FileNotFoundError(
            f"no indexed dataset at prefix {prefix!r} ({prefix}.bin / {prefix}.idx); build it "
            "with nemo_checkpointless.data.ensure_indexed_dataset(cache_dir) or "
            "`python scripts/data/build_dataset.py --output-prefix PREFIX`"
        )
    prefix = os.path.realpath(prefix)  # part of Megatron's cache key: make it canonical
    cache_dir = os.path.abspath(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    config = make_gpt_config(prefix, seq_length, seed, cache_dir, tokenizer)
    indexed = GPTDataset.build_low_level_dataset(prefix, config)
    sequences = numpy.arange(GPTDataset.numel_low_level_dataset(indexed), dtype=numpy.int32)

    def make(cfg: GPTDatasetConfig) -> GPTDataset:
        return GPTDataset(indexed, prefix, sequences, num_samples, Split.train, cfg)

    # Cheap probe: the cache key without the indices (how depends on the release).
    probe, told = dataset_cache_probe(
        GPTDataset, make_gpt_config(prefix, seq_length, seed, cache_dir, tokenizer),
        indexed, prefix, sequences, num_samples, Split.train)
    files = _cache_files(probe, cache_dir)
    if told is not None and told != files["document_index"]:
        raise _renamed_cache()

    def cached() -> bool:
        return all(map(os.path.isfile, files.values()))

    if not cached():
        with file_lock(os.path.join(cache_dir, _LOCK_NAME)):
            if not cached():
                in_memory = make_gpt_config(prefix, seq_length, seed, "", tokenizer)
                # GPTDataset warns that it cannot save without a cache path: we save it.
                with quiet_logger(GPTDataset.__module__):
                    built = make(in_memory)
                with private_tmp_dir(cache_dir) as tmp_dir:
                    _save_and_publish(built, tmp_dir, cache_dir)
    dataset = make(config)
    # where the probe could not tell: the indices megatron-core opened are ours
    if getattr(dataset.document_index, "filename", files["document_index"]) != files[
            "document_index"]:
        raise _renamed_cache()
    return dataset


def _renamed_cache() -> RuntimeError:
    return RuntimeError(
        "this megatron-core names its GPTDataset index cache differently than "
        "nemo_checkpointless.data expects; update _cache_files for it"
    )
