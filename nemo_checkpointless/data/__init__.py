"""Data path: bundled corpus, byte-level BPE tokenizer, indexed dataset, GPT samples, sampler.

Typical use (no network, no process group needed)::

    from nemo_checkpointless import data

    tokenizer = data.load_tokenizer()
    prefix = data.ensure_indexed_dataset("/tmp/nc-data")
    dataset = data.build_gpt_dataset(prefix, seq_length=256, num_samples=10_000, seed=1234,
                                     cache_dir="/tmp/nc-data/index-cache", tokenizer=tokenizer)
    for micro in data.micro_batch_indices(consumed, gbs, mbs, dp_rank, dp_size):
        batch = data.collate([dataset[i] for i in micro])
"""

from nemo_checkpointless.data.build import (
    build_indexed_dataset,
    dataset_key,
    ensure_indexed_dataset,
)
from nemo_checkpointless.data.corpus import (
    DOC_SEPARATOR,
    bundled_corpus_path,
    join_documents,
    read_documents,
    split_documents,
)
from nemo_checkpointless.data.dataset import build_gpt_dataset, make_gpt_config
from nemo_checkpointless.data.sampler import (
    batch_hash,
    collate,
    global_batch_indices,
    micro_batch_indices,
)
from nemo_checkpointless.data.tokenizer import (
    EOD_TOKEN,
    BPETokenizer,
    bundled_tokenizer_path,
    load_tokenizer,
)

__all__ = [
    "BPETokenizer",
    "DOC_SEPARATOR",
    "EOD_TOKEN",
    "batch_hash",
    "build_gpt_dataset",
    "build_indexed_dataset",
    "bundled_corpus_path",
    "bundled_tokenizer_path",
    "collate",
    "dataset_key",
    "ensure_indexed_dataset",
    "global_batch_indices",
    "join_documents",
    "load_tokenizer",
    "make_gpt_config",
    "micro_batch_indices",
    "read_documents",
    "split_documents",
]
