#!/usr/bin/env python
"""Train the bundled byte-level BPE tokenizer on the bundled corpus (pure Python, ~1 s).

Writes ``nemo_checkpointless/data/assets/tokenizer.json``: 256 byte tokens, the learned
merges, and ``<|endoftext|>`` as the last id (4096 ids in all by default). Training is
deterministic (ties between equally frequent pairs go to the smallest pair of ids), so
rerunning this script on the same corpus reproduces the bundled file::

    python scripts/data/train_tokenizer.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

_REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from nemo_checkpointless.data import bpe  # noqa: E402
from nemo_checkpointless.data.corpus import bundled_corpus_path, read_documents  # noqa: E402
from nemo_checkpointless.data.tokenizer import (  # noqa: E402
    BPETokenizer,
    bundled_tokenizer_path,
)


def _format_spec(spec: dict) -> str:
    """JSON with one merge per line, so that retraining gives a readable diff."""
    header = {key: value for key, value in spec.items() if key != "merges"}
    text = json.dumps(header, indent=2, ensure_ascii=False)
    merges = ",\n".join(f"    [{a}, {b}]" for a, b in spec["merges"])
    return text[: -len("\n}")] + ',\n  "merges": [\n' + merges + "\n  ]\n}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=bundled_corpus_path())
    parser.add_argument("--output", default=bundled_tokenizer_path())
    parser.add_argument("--vocab-size", type=int, default=4096, help="bytes + merges + EOD")
    parser.add_argument(
        "--max-documents",
        type=int,
        default=None,
        help="train on the first N documents only (default: all)",
    )
    args = parser.parse_args()

    num_merges = args.vocab_size - bpe.NUM_BYTE_TOKENS - 1
    if num_merges < 0:
        raise SystemExit(f"--vocab-size must be at least {bpe.NUM_BYTE_TOKENS + 1}")

    with open(args.corpus, "rb") as f:
        corpus_sha256 = hashlib.sha256(f.read()).hexdigest()
    documents = read_documents(args.corpus)[: args.max_documents]
    start = time.perf_counter()
    merges = bpe.train_bpe(bpe.count_words(documents), num_merges)
    elapsed = time.perf_counter() - start

    tokenizer = BPETokenizer(merges)
    spec = tokenizer.to_dict(
        corpus=os.path.basename(args.corpus),
        corpus_sha256=corpus_sha256,
        training_documents=len(documents),
    )
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(_format_spec(spec))
    os.replace(tmp, args.output)
    print(
        f"wrote {args.output}: vocab_size={tokenizer.vocab_size} eod={tokenizer.eod} "
        f"merges={len(merges)} trained on {len(documents)} documents in {elapsed:.1f}s"
    )


if __name__ == "__main__":
    main()
