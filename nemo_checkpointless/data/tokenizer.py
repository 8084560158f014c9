"""Byte-level BPE tokenizer for Megatron, loaded from a merges file bundled with the package.

The tokenizer file (``assets/tokenizer.json``, written by ``scripts/data/train_tokenizer.py``)
holds the merges as pairs of token ids. Ids ``0..255`` are bytes, ``256..256+len(merges)-1``
are merges, and the special ``<|endoftext|>`` (EOD) token comes last, so the default
vocabulary has 4096 entries. Encoding is exact: ``detokenize(tokenize(s)) == s`` for every
string ``s`` (``<|endoftext|>`` inside text is encoded as plain text, never as EOD).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from nemo_checkpointless.data import bpe
from nemo_checkpointless.data._logging import quiet_logger
from nemo_checkpointless.data.corpus import ASSETS_DIR

from nemo_checkpointless.compat.megatron_versions import legacy_tokenizer_base

# megatron-core's legacy tokenizer base (its module is gone in 0.19: the package's own then)
_MegatronTokenizer = legacy_tokenizer_base()

EOD_TOKEN = "<|endoftext|>"
TOKENIZER_FORMAT = "nemo_checkpointless.byte_bpe"
TOKENIZER_FORMAT_VERSION = 1
_MAX_CACHED_WORDS = 1 << 18


def bundled_tokenizer_path() -> str:
    """Return the path of the tokenizer file bundled with the package."""
    return os.path.join(ASSETS_DIR, "tokenizer.json")


class BPETokenizer(_MegatronTokenizer):
    """Byte-level BPE tokenizer usable as ``GPTDatasetConfig.tokenizer``.

    Args:
        merges: learned merges, ``merges[i]`` is the pair of ids that forms token ``256 + i``.
        pattern: the pre-tokenisation regex the merges were trained with.
        source: where the merges come from (bookkeeping only, not part of the identity).
    """

    def __init__(
        self,
        merges: Sequence[Sequence[int]],
        pattern: str = bpe.PRETOKENIZE_PATTERN,
        source: str | None = None,
    ) -> None:
        merges = [(int(a), int(b)) for a, b in merges]
        for i, (a, b) in enumerate(merges):
            if not (0 <= a < bpe.NUM_BYTE_TOKENS + i and 0 <= b < bpe.NUM_BYTE_TOKENS + i):
                raise ValueError(
                    f"merge {i} = ({a}, {b}) refers to a token that does not exist yet; "
                    "the tokenizer file is corrupt, regenerate it with "
                    "`python scripts/data/train_tokenizer.py`"
                )
        if pattern != bpe.PRETOKENIZE_PATTERN:
            raise ValueError(
                "the tokenizer was trained with a different pre-tokenisation pattern than "
                "this version of nemo_checkpointless uses; retrain it with "
                "`python scripts/data/train_tokenizer.py`"
            )
        self._merges = merges
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._token_bytes = bpe.token_bytes_table(merges)
        self._eod = len(self._token_bytes)
        self._source = source
        self._word_cache: dict[str, list[int]] = {}
        self._fingerprint = hashlib.sha256(
            json.dumps({"merges": merges, "eod": EOD_TOKEN}).encode("utf-8")
        ).hexdigest()

        byte_chars = bpe.bytes_to_unicode()
        self._inv_vocab = {
            i: "".join(byte_chars[b] for b in token) for i, token in enumerate(self._token_bytes)
        }
        self._inv_vocab[self._eod] = EOD_TOKEN
        self._vocab: dict[str, int] = {}
        for i, text in self._inv_vocab.items():
            self._vocab.setdefault(text, i)  # rare duplicate byte strings keep the lowest id

        # The base constructor logs a "legacy tokenizer" deprecation warning; the newer
        # megatron.core.tokenizers API needs a tokenizer library, this class needs none.
        with quiet_logger(_MegatronTokenizer.__module__):
            super().__init__(fingerprint=self._fingerprint, vocab_size=self.vocab_size)

    # -- encoding -------------------------------------------------------------------------

    def _encode_piece(self, piece: str) -> list[int]:
        ids = self._word_cache.get(piece)
        if ids is None:
            ids = bpe.encode_word(piece.encode("utf-8"), self._ranks)
            if len(self._word_cache) >= _MAX_CACHED_WORDS:
                self._word_cache.clear()
            self._word_cache[piece] = ids
        return ids

    def tokenize(self, text: str) -> list[int]:
        """Encode text into token ids (no EOD is added)."""
        ids: list[int] = []
        for piece in bpe.pretokenize(text):
            ids.extend(self._encode_piece(piece))
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        """Decode token ids into text; EOD becomes ``<|endoftext|>``.

        Accepts lists, numpy arrays and 1-D tensors. Byte sequences that are not valid UTF-8
        (e.g. a multi-byte character cut by a sample boundary) decode to U+FFFD.
        """
        table, eod = self._token_bytes, self._eod
        parts: list[bytes] = []
        for raw in ids:
            i = int(raw)
            if 0 <= i < eod:
                parts.append(table[i])
            elif i == eod:
                parts.append(EOD_TOKEN.encode("utf-8"))
            else:
                raise ValueError(
                    f"token id {i} is outside the vocabulary [0, {self.vocab_size}); "
                    "were these ids produced by a different tokenizer?"
                )
        return b"".join(parts).decode("utf-8", errors="replace")

    # -- megatron tokenizer interface ------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids: 256 bytes + merges + EOD."""
        return len(self._token_bytes) + 1

    @property
    def eod(self) -> int:
        """Id of the ``<|endoftext|>`` token appended after every document."""
        return self._eod

    @property
    def vocab(self) -> dict[str, int]:
        """Token string (GPT-2 byte-to-unicode spelling) to id."""
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        """Id to token string (GPT-2 byte-to-unicode spelling)."""
        return self._inv_vocab

    # -- identity --------------------------------------------------------------------------

    @property
    def merges(self) -> list[tuple[int, int]]:
        """The merges, in training order (a copy)."""
        return list(self._merges)

    @property
    def fingerprint(self) -> str:
        """sha256 of the merges and special tokens: equal fingerprints encode identically."""
        return self._fingerprint

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a non-special token stands for."""
        return self._token_bytes[token_id]

    def to_dict(self, **metadata: Any) -> dict[str, Any]:
        """Serialisable form, as written to ``tokenizer.json``."""
        return {
            "format": TOKENIZER_FORMAT,
            "version": TOKENIZER_FORMAT_VERSION,
            "pattern": bpe.PRETOKENIZE_PATTERN,
            "vocab_size": self.vocab_size,
            "special_tokens": {EOD_TOKEN: self.eod},
            "metadata": metadata,
            "merges": [list(pair) for pair in self._merges],
        }

    def __repr__(self) -> str:
        return (
            f"BPETokenizer(vocab_size={self.vocab_size}, eod={self.eod}, "
            f"fingerprint={self.fingerprint[:12]}, source={self._source!r})"
        )


def load_tokenizer(path: str | None = None) -> BPETokenizer:
    """Load a tokenizer file written by ``scripts/data/train_tokenizer.py``.

    Args:
        path: the ``tokenizer.json`` to load; defaults to the one bundled with the package.
    """
    path = bundled_tokenizer_path() if path is None else path
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer file {path!r} does not exist; train one with "
            "`python scripts/data/train_tokenizer.py --output PATH` or omit `path` to use "
            "the bundled tokenizer"
        )
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    if spec.get("format") != TOKENIZER_FORMAT or spec.get("version") != TOKENIZER_FORMAT_VERSION:
        raise ValueError(
            f"{path!r} is not a {TOKENIZER_FORMAT} v{TOKENIZER_FORMAT_VERSION} tokenizer file "
            f"(format={spec.get('format')!r}, version={spec.get('version')!r}); retrain it "
            "with `python scripts/data/train_tokenizer.py`"
        )
    tokenizer = BPETokenizer(spec["merges"], pattern=spec["pattern"], source=path)
    expected = {"vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod}
    recorded = {"vocab_size": spec.get("vocab_size"), "eod": spec["special_tokens"].get(EOD_TOKEN)}
    if expected != recorded:
        raise ValueError(
            f"{path!r} is inconsistent: it records {recorded} but its merges give {expected}; "
            "retrain it with `python scripts/data/train_tokenizer.py`"
        )
    return tokenizer
