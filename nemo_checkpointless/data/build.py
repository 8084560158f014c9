"""Tokenise a corpus into Megatron's indexed dataset format (``<prefix>.bin`` + ``<prefix>.idx``).

Each corpus document becomes one Megatron document holding one sequence: its tokens
followed by the tokenizer's EOD token. The token dtype is the one Megatron picks for the
vocabulary size (``DType.optimal_dtype``: uint16 below 65500 ids).
"""

from __future__ import annotations

import hashlib
import os

import numpy
import torch
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from nemo_checkpointless.data._fs import file_lock, fsync_file, unique_tmp_name
from nemo_checkpointless.data.corpus import bundled_corpus_path, read_documents
from nemo_checkpointless.data.tokenizer import BPETokenizer, load_tokenizer

DATASET_NAME = "corpus"
"""Stem of the prefixes that :func:`ensure_indexed_dataset` creates."""


def build_indexed_dataset(corpus_path: str, output_prefix: str, tokenizer: BPETokenizer) -> str:
    """Tokenise ``corpus_path`` into ``output_prefix.bin`` / ``output_prefix.idx``.

    The files are written under a temporary prefix and renamed into place (``.bin`` first,
    ``.idx`` last), so a reader never sees a half-written dataset: Megatron only opens a
    prefix when both files exist. An existing dataset at ``output_prefix`` is replaced.

    Args:
        corpus_path: a corpus file (documents separated by ``<|doc|>`` lines).
        output_prefix: path prefix of the dataset to write; parent directories are created.
        tokenizer: the tokenizer; its EOD id ends every document.

    Returns:
        ``output_prefix``.
    """
    documents = read_documents(corpus_path)
    if not documents:
        raise ValueError(f"corpus {corpus_path!r} has no documents; nothing to build")
    parent = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(parent, exist_ok=True)

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    tmp_prefix = unique_tmp_name(output_prefix)
    try:
        builder = IndexedDatasetBuilder(get_bin_path(tmp_prefix), dtype=dtype)
        for doc in documents:
            ids = tokenizer.tokenize(doc)
            ids.append(tokenizer.eod)
            builder.add_item(torch.from_numpy(numpy.asarray(ids, dtype=numpy.int64)))
            builder.end_document()
        builder.finalize(get_idx_path(tmp_prefix))
        for path in (get_bin_path(tmp_prefix), get_idx_path(tmp_prefix)):
            fsync_file(path)
        os.replace(get_bin_path(tmp_prefix), get_bin_path(output_prefix))
        os.replace(get_idx_path(tmp_prefix), get_idx_path(output_prefix))
    finally:
        for path in (get_bin_path(tmp_prefix), get_idx_path(tmp_prefix)):
            if os.path.exists(path):
                os.remove(path)
    return output_prefix


def dataset_key(corpus_path: str, tokenizer: BPETokenizer) -> str:
    """Hex key identifying the dataset built from this corpus content with this tokenizer."""
    digest = hashlib.sha256()
    with open(corpus_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    digest.update(b"\0")
    digest.update(tokenizer.fingerprint.encode("ascii"))
    digest.update(b"\0")
    digest.update(str(numpy.dtype(DType.optimal_dtype(tokenizer.vocab_size))).encode("ascii"))
    return digest.hexdigest()[:16]


def ensure_indexed_dataset(
    cache_dir: str,
    corpus_path: str | None = None,
    tokenizer: BPETokenizer | None = None,
) -> str:
    """Build the indexed dataset into ``cache_dir`` once and return its prefix.

    The prefix is ``<cache_dir>/corpus-<key>`` where ``key`` hashes the corpus content and
    the tokenizer, so a changed corpus or tokenizer gets a fresh dataset. Concurrent callers
    (ranks of one job, no process group needed) serialise on a file lock; the first builds,
    the others find the finished files.

    Args:
        cache_dir: directory to hold the dataset; created if missing.
        corpus_path: corpus file; defaults to the bundled corpus.
        tokenizer: tokenizer; defaults to the bundled one.

    Returns:
        The dataset prefix (pass it to :func:`nemo_checkpointless.data.build_gpt_dataset`).
    """
    corpus_path = bundled_corpus_path() if corpus_path is None else corpus_path
    tokenizer = load_tokenizer() if tokenizer is None else tokenizer
    prefix = os.path.join(
        os.path.abspath(cache_dir), f"{DATASET_NAME}-{dataset_key(corpus_path, tokenizer)}"
    )
    if IndexedDataset.exists(prefix):
        return prefix
    with file_lock(prefix + ".lock"):
        if not IndexedDataset.exists(prefix):
            build_indexed_dataset(corpus_path, prefix, tokenizer)
    return prefix
