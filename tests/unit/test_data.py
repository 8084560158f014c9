"""Unit tests of nemo_checkpointless.data (CPU only, no process group)."""

from __future__ import annotations

import multiprocessing
import os
import random

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from nemo_checkpointless import data
from nemo_checkpointless.data import bpe

NUM_TINY_DOCS = 60


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> data.BPETokenizer:
    return data.load_tokenizer()


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return data.read_documents()


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory, documents) -> tuple[str, list[str]]:
    """A small corpus file: every 50th bundled document (varied modules, fast to build)."""
    docs = documents[::50][:NUM_TINY_DOCS]
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(data.join_documents(docs), encoding="utf-8")
    return str(path), docs


@pytest.fixture(scope="module")
def tiny_prefix(tmp_path_factory, tiny_corpus, tokenizer) -> str:
    out = tmp_path_factory.mktemp("indexed")
    return data.build_indexed_dataset(tiny_corpus[0], str(out / "tiny"), tokenizer)


def _samples(dataset, indices) -> list[dict]:
    return [dataset[i] for i in indices]


# -- corpus -------------------------------------------------------------------------------


def test_bundled_corpus_is_real_text(documents):
    size = os.path.getsize(data.bundled_corpus_path())
    assert 1_000_000 <= size <= 3_000_000
    assert len(documents) > 1000
    assert all(doc and data.DOC_SEPARATOR not in doc for doc in documents)
    assert any(doc.startswith("json.dumps\n") for doc in documents)


def test_split_join_documents_roundtrip():
    docs = ["first\n\nwith blank line", "second", "ünïcödé ☃"]
    assert data.split_documents(data.join_documents(docs)) == docs
    with pytest.raises(ValueError, match="separator"):
        data.join_documents(["a" + data.DOC_SEPARATOR + "b"])


# -- tokenizer ----------------------------------------------------------------------------


def test_vocab_size_and_eod(tokenizer):
    assert tokenizer.vocab_size == 4096
    assert tokenizer.eod == 4095
    assert tokenizer.inv_vocab[tokenizer.eod] == data.EOD_TOKEN
    assert tokenizer.vocab[data.EOD_TOKEN] == tokenizer.eod
    assert len(tokenizer.inv_vocab) == tokenizer.vocab_size
    assert all(tokenizer.inv_vocab[i] == s for s, i in tokenizer.vocab.items())
    assert tokenizer.unique_identifiers["fingerprint"] == tokenizer.fingerprint


def test_roundtrip_on_corpus_excerpts(tokenizer, documents):
    text = data.join_documents(documents)
    rng = random.Random(0)
    excerpts = documents[:100] + [
        text[start : start + rng.randint(1, 3000)]
        for start in (rng.randrange(len(text)) for _ in range(200))
    ]
    for excerpt in excerpts:
        ids = tokenizer.tokenize(excerpt)
        assert all(0 <= i < tokenizer.eod for i in ids)
        assert tokenizer.detokenize(ids) == excerpt


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "\n\n\t  \r\n",
        "héllo wörld, naïve café",
        "日本語のテキスト and 中文",
        "emoji 🎉🚀 and ZWJ 👩‍👩‍👧 family",
        "combining e\u0301 and Å",
        "NUL \x00 and DEL \x7f",
        "snake_case __dunder__ 123456789 3.14 1e-10",
        "<|endoftext|> stays text",
        "Ελληνικά Русский עברית العربية",
    ],
)
def test_roundtrip_unicode(tokenizer, text):
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text
    assert "".join(bpe.pretokenize(text)) == text


def test_special_token_text_is_not_eod(tokenizer):
    assert tokenizer.eod not in tokenizer.tokenize(data.EOD_TOKEN)
    assert tokenizer.detokenize([tokenizer.eod]) == data.EOD_TOKEN


def test_detokenize_accepts_arrays_and_rejects_unknown_ids(tokenizer):
    ids = tokenizer.tokenize("arrays too")
    assert tokenizer.detokenize(numpy.array(ids)) == "arrays too"
    assert tokenizer.detokenize(torch.tensor(ids)) == "arrays too"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.detokenize([tokenizer.vocab_size])


def test_compression(tokenizer, documents):
    sample = "".join(documents[:300])
    ratio = len(sample.encode("utf-8")) / len(tokenizer.tokenize(sample))
    assert ratio > 3.0


def test_bundled_tokenizer_is_reproducible(tokenizer, documents):
    """Retraining on the bundled corpus gives exactly the bundled merges (provenance)."""
    merges = bpe.train_bpe(bpe.count_words(documents), tokenizer.vocab_size - 257)
    assert merges == tokenizer.merges


def test_train_bpe_small_and_errors():
    counts = {b"abab": 3, b"ab": 2, b"ba": 1}
    merges = bpe.train_bpe(counts, 2)
    assert merges == bpe.train_bpe(counts, 2)
    assert merges[0] == (ord("a"), ord("b"))
    with pytest.raises(ValueError, match="lower the vocabulary size"):
        bpe.train_bpe({b"ab": 1}, 5)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_tokenizer.py"):
        data.load_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="retrain"):
        data.load_tokenizer(str(bad))


# -- indexed dataset ----------------------------------------------------------------------


def test_build_indexed_dataset_reads_back(tiny_prefix, tiny_corpus, tokenizer):
    _, docs = tiny_corpus
    indexed = IndexedDataset(tiny_prefix)
    assert len(indexed) == len(docs)
    assert list(indexed.document_indices) == list(range(len(docs) + 1))
    assert indexed.index.dtype == numpy.uint16
    for i, doc in enumerate(docs):
        assert indexed[i].tolist() == tokenizer.tokenize(doc) + [tokenizer.eod]
    leftovers = [n for n in os.listdir(os.path.dirname(tiny_prefix)) if ".tmp-" in n]
    assert leftovers == []


def test_ensure_indexed_dataset_is_idempotent_and_keyed(tmp_path, tiny_corpus, tokenizer):
    corpus_path, docs = tiny_corpus
    prefix = data.ensure_indexed_dataset(str(tmp_path), corpus_path, tokenizer)
    mtime = os.stat(prefix + ".idx").st_mtime_ns
    assert data.ensure_indexed_dataset(str(tmp_path), corpus_path, tokenizer) == prefix
    assert os.stat(prefix + ".idx").st_mtime_ns == mtime

    other = tmp_path / "other.txt"
    other.write_text(data.join_documents(docs[:5]), encoding="utf-8")
    other_prefix = data.ensure_indexed_dataset(str(tmp_path), str(other), tokenizer)
    assert other_prefix != prefix
    assert len(IndexedDataset(other_prefix)) == 5


def test_ensure_indexed_dataset_default_is_bundled(tmp_path, documents):
    prefix = data.ensure_indexed_dataset(str(tmp_path))
    assert len(IndexedDataset(prefix)) == len(documents)


# -- GPT dataset --------------------------------------------------------------------------


def test_gpt_dataset_samples(tiny_prefix, tokenizer, tmp_path):
    assert not torch.distributed.is_initialized()
    seq_length, num_samples = 64, 500
    ds = data.build_gpt_dataset(
        tiny_prefix, seq_length, num_samples, 1234, str(tmp_path), tokenizer
    )
    assert len(ds) >= num_samples
    # Megatron's token stream: the documents (EOD-terminated) in its shuffled epoch order.
    indexed = IndexedDataset(tiny_prefix)  # keep alive: its items are views of its mmap
    stream = numpy.concatenate([indexed[int(d)] for d in ds.document_index]).astype(numpy.int64)
    doc_starts = numpy.concatenate([[0], numpy.cumsum(indexed.sequence_lengths[ds.document_index])])
    for i in (0, 1, num_samples // 2, num_samples - 1):
        sample = ds[i]
        assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
        for key in sample:
            assert sample[key].shape == (seq_length,)
        assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
        assert torch.equal(sample["position_ids"], torch.arange(seq_length))
        assert torch.all(sample["loss_mask"] == 1)
        # tokens + last label are seq_length + 1 consecutive tokens of the stream.
        doc, offset = ds.sample_index[ds.shuffle_index[i]]
        start = int(doc_starts[doc] + offset)
        window = torch.cat([sample["tokens"], sample["labels"][-1:]])
        assert window.tolist() == stream[start : start + seq_length + 1].tolist()
    assert tokenizer.eod in torch.cat([ds[i]["tokens"] for i in range(50)]).tolist()


def test_gpt_dataset_is_deterministic(tiny_prefix, tokenizer, tmp_path):
    args = (tiny_prefix, 32, 300)
    first = data.build_gpt_dataset(*args, 7, str(tmp_path / "a"), tokenizer)
    second = data.build_gpt_dataset(*args, 7, str(tmp_path / "b"), tokenizer)
    cached = data.build_gpt_dataset(*args, 7, str(tmp_path / "a"), tokenizer)
    reseeded = data.build_gpt_dataset(*args, 8, str(tmp_path / "c"), tokenizer)
    indices = range(0, 300, 7)
    for ds in (second, cached):
        for x, y in zip(_samples(first, indices), _samples(ds, indices)):
            assert torch.equal(x["tokens"], y["tokens"])
    assert any(
        not torch.equal(x["tokens"], y["tokens"])
        for x, y in zip(_samples(first, indices), _samples(reseeded, indices))
    )


def test_gpt_dataset_missing_prefix_is_explained(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="ensure_indexed_dataset"):
        data.build_gpt_dataset(str(tmp_path / "nope"), 8, 8, 0, str(tmp_path), tokenizer)


def _concurrent_worker(barrier, queue, cache_dir, corpus_path) -> None:
    tokenizer = data.load_tokenizer()
    barrier.wait()
    prefix = data.ensure_indexed_dataset(cache_dir, corpus_path, tokenizer)
    ds = data.build_gpt_dataset(prefix, 16, 200, 3, os.path.join(cache_dir, "idx"), tokenizer)
    batch = data.collate([ds[i] for i in range(0, 200, 10)])
    queue.put((prefix, data.batch_hash(batch["tokens"])))


def test_concurrent_builders_agree(tmp_path, tiny_corpus):
    ctx = multiprocessing.get_context("fork")
    n = 4
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=_concurrent_worker, args=(barrier, queue, str(tmp_path), tiny_corpus[0]))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(set(results)) == 1
    leftovers = [n for n in os.listdir(tmp_path / "idx") if n.startswith(".tmp")]
    assert leftovers == []


# -- sampler ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gbs,mbs,dp", [(1, 1, 1), (8, 2, 2), (12, 1, 4), (16, 4, 2), (32, 2, 8), (6, 3, 2)]
)
@pytest.mark.parametrize("consumed", [0, 5, 96, 10_000])
def test_micro_batches_partition_global_batch(consumed, gbs, mbs, dp):
    expected = data.global_batch_indices(consumed, gbs)
    assert expected == range(consumed, consumed + gbs)
    seen = []
    for rank in range(dp):
        micro = data.micro_batch_indices(consumed, gbs, mbs, rank, dp)
        assert len(micro) == gbs // (dp * mbs)
        assert all(len(m) == mbs for m in micro)
        flat = [i for m in micro for i in m]
        assert flat == list(range(flat[0], flat[0] + len(flat)))  # contiguous chunk
        seen.extend(flat)
    assert seen == list(expected)


def test_position_depends_only_on_consumed_samples():
    gbs, mbs, dp, steps = 16, 2, 4, 10

    def step_indices(consumed: int, mbs: int, dp: int) -> list[int]:
        return [
            i
            for rank in range(dp)
            for micro in data.micro_batch_indices(consumed, gbs, mbs, rank, dp)
            for i in micro
        ]

    # Consecutive steps tile the sample space with no gap and no overlap.
    walked = [i for step in range(steps) for i in step_indices(step * gbs, mbs, dp)]
    assert walked == list(range(steps * gbs))
    # A restart at consumed_samples (even with another DP size or micro batch size) reads
    # the same global batch as an uninterrupted run would have.
    consumed = 5 * gbs
    assert step_indices(consumed, 4, 2) == walked[consumed : consumed + gbs]
    assert step_indices(consumed, 1, 16) == walked[consumed : consumed + gbs]
    # Each rank's slice is a function of (consumed, sizes, rank) only.
    shifted = [[i + consumed for i in m] for m in data.micro_batch_indices(0, gbs, mbs, 1, dp)]
    assert data.micro_batch_indices(consumed, gbs, mbs, 1, dp) == shifted


@pytest.mark.parametrize(
    "args,match",
    [
        ((0, 10, 1, 0, 4), r"global_batch_size \(10\) is not divisible by the data-parallel "),
        ((0, 12, 4, 0, 2), r"per-rank batch .* = 6 is not divisible by micro_batch_size \(4\)"),
        ((0, 8, 1, 2, 2), r"dp_rank must be in \[0, 2\)"),
        ((0, 0, 1, 0, 1), "global_batch_size must be a positive integer"),
        ((0, 8, 0, 0, 1), "micro_batch_size must be a positive integer"),
        ((-1, 8, 1, 0, 1), "consumed_samples must be a non-negative integer"),
    ],
)
def test_bad_batch_sizes_raise_helpful_errors(args, match):
    with pytest.raises(ValueError, match=match):
        data.micro_batch_indices(*args)


def test_collate_and_batch_hash():
    samples = [
        {"tokens": torch.arange(4) + i, "loss_mask": torch.ones(4), "attention_mask": None}
        for i in range(3)
    ]
    batch = data.collate(samples)
    assert set(batch) == {"tokens", "loss_mask"}
    assert batch["tokens"].shape == (3, 4)
    assert torch.equal(batch["tokens"][2], torch.arange(4) + 2)
    digest = data.batch_hash(batch["tokens"])
    assert len(digest) == 64
    assert digest == data.batch_hash(batch["tokens"].to(torch.int32))
    changed = batch["tokens"].clone()
    changed[0, 0] += 1
    assert data.batch_hash(changed) != digest
    with pytest.raises(ValueError, match="same dataset"):
        data.collate([{"tokens": torch.zeros(2)}, {"labels": torch.zeros(2)}])
