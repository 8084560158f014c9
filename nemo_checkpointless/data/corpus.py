"""The bundled text corpus: where it lives and how its documents are delimited.

The corpus file is plain UTF-8 text made of documents joined by :data:`DOC_SEPARATOR`
(a blank line, then a line ``<|doc|>``), followed by one final newline. It is produced by
``scripts/data/make_corpus.py`` from the docstrings of the Python standard library.
"""

from __future__ import annotations

import os

DOC_SEPARATOR = "\n\n<|doc|>\n"
"""Separator between two documents of a corpus file."""

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
"""Directory of the files bundled with the package (corpus, tokenizer)."""


def bundled_corpus_path() -> str:
    """Return the path of the corpus bundled with the package."""
    return os.path.join(ASSETS_DIR, "corpus.txt")


def split_documents(text: str) -> list[str]:
    """Split the text of a corpus file into its documents.

    Inverse of :func:`join_documents`: ``split_documents(join_documents(docs)) == docs``.
    Empty documents (e.g. from an empty file) are dropped.
    """
    if text.endswith("\n"):
        text = text[:-1]
    return [doc for doc in text.split(DOC_SEPARATOR) if doc]


def join_documents(documents: list[str]) -> str:
    """Join documents into the text of a corpus file (see :data:`DOC_SEPARATOR`)."""
    for i, doc in enumerate(documents):
        if DOC_SEPARATOR in doc:
            raise ValueError(
                f"document {i} contains the separator {DOC_SEPARATOR!r}; remove the "
                "'<|doc|>' line from it before joining"
            )
    return DOC_SEPARATOR.join(documents) + "\n"


def read_documents(corpus_path: str | None = None) -> list[str]:
    """Read the documents of a corpus file (default: the bundled corpus)."""
    path = bundled_corpus_path() if corpus_path is None else corpus_path
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"corpus file {path!r} does not exist; pass an existing file or regenerate the "
            "bundled one with `python scripts/data/make_corpus.py`"
        )
    with open(path, encoding="utf-8", newline="") as f:
        return split_documents(f.read())
