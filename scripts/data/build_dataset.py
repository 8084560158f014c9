#!/usr/bin/env python
"""Tokenise a corpus into a Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

Defaults: the corpus and tokenizer bundled with nemo_checkpointless, output ``./data/tiny``::

    python scripts/data/build_dataset.py
    python scripts/data/build_dataset.py --corpus my.txt --output-prefix /data/my
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from nemo_checkpointless.data import (  # noqa: E402
    build_indexed_dataset,
    bundled_corpus_path,
    load_tokenizer,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--corpus",
        default=bundled_corpus_path(),
        help="corpus file, documents separated by '<|doc|>' lines (default: bundled corpus)",
    )
    parser.add_argument("--output-prefix", default=os.path.join("data", "tiny"))
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer.json (default: bundled tokenizer)"
    )
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.tokenizer)
    start = time.perf_counter()
    prefix = build_indexed_dataset(args.corpus, args.output_prefix, tokenizer)
    elapsed = time.perf_counter() - start
    print(
        f"wrote {prefix}.bin ({os.path.getsize(prefix + '.bin')} bytes) and {prefix}.idx "
        f"in {elapsed:.2f}s with {tokenizer}"
    )


if __name__ == "__main__":
    main()
