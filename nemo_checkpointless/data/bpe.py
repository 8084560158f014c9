"""Pure-Python byte-level BPE: pre-tokenisation, training and per-word encoding.

Token ids ``0..255`` are the raw bytes; merge ``i`` (0-based, in training order) creates
token ``256 + i`` from the pair ``merges[i]``. Special tokens come after the merges.
This module has no dependency on Megatron so that training scripts stay light.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

PRETOKENIZE_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d{1,3}| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""
)
"""GPT-2 style split: contractions, letter runs, 1-3 digit runs, punctuation/underscore runs
(each optionally preceded by one space), whitespace. Together the alternatives cover every
character, so pre-tokenisation is lossless."""

_PRETOKENIZE_RE = re.compile(PRETOKENIZE_PATTERN)

NUM_BYTE_TOKENS = 256


def pretokenize(text: str) -> list[str]:
    """Split text into the pieces BPE merges never cross; ``"".join(pieces) == text``."""
    pieces = _PRETOKENIZE_RE.findall(text)
    if sum(map(len, pieces)) != len(text):  # defensive: keep any unmatched gap
        pieces, pos = [], 0
        for match in _PRETOKENIZE_RE.finditer(text):
            if match.start() > pos:
                pieces.append(text[pos : match.start()])
            pieces.append(match.group())
            pos = match.end()
        if pos < len(text):
            pieces.append(text[pos:])
    return pieces


def count_words(texts: Iterable[str]) -> Counter[bytes]:
    """Count the UTF-8 encoded pre-tokenised pieces of some texts."""
    counts: Counter[bytes] = Counter()
    for text in texts:
        counts.update(piece.encode("utf-8") for piece in pretokenize(text))
    return counts


def _merge_pair(word: Sequence[int], a: int, b: int, new: int) -> list[int]:
    """Replace every non-overlapping occurrence of ``(a, b)`` in word, left to right."""
    out: list[int] = []
    i, n = 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(word_counts: Mapping[bytes, int], num_merges: int) -> list[tuple[int, int]]:
    """Learn ``num_merges`` byte-pair merges from word frequencies.

    The most frequent adjacent pair is merged at each step; ties go to the smallest pair
    ``(a, b)``, which makes training deterministic. Pair counts are updated incrementally,
    only for words that contain the merged pair.

    Raises:
        ValueError: if the words run out of pairs before ``num_merges`` merges (use a bigger
            corpus or a smaller vocabulary).
    """
    words = [list(word) for word in sorted(word_counts)]
    freqs = [word_counts[word] for word in sorted(word_counts)]
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for i, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    while len(merges) < num_merges:
        if not heap:
            raise ValueError(
                f"the corpus only supports {len(merges)} merges, {num_merges} were requested; "
                "train on more text or lower the vocabulary size"
            )
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count or neg_count == 0:
            continue  # stale heap entry
        new_id = NUM_BYTE_TOKENS + len(merges)
        merges.append(pair)
        a, b = pair
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for i in sorted(where.pop(pair, ())):
            word, freq = words[i], freqs[i]
            merged = _merge_pair(word, a, b, new_id)
            if len(merged) == len(word):
                continue
            for old in zip(word, word[1:]):
                delta[old] -= freq
            for fresh in zip(merged, merged[1:]):
                delta[fresh] += freq
                if new_id in fresh:
                    where[fresh].add(i)
            words[i] = merged
        for changed, d in delta.items():
            if d:
                pair_counts[changed] += d
                if pair_counts[changed] > 0:
                    heapq.heappush(heap, (-pair_counts[changed], changed))
                else:
                    pair_counts.pop(changed)
        pair_counts.pop(pair, None)
    return merges


def encode_word(word: bytes, ranks: Mapping[tuple[int, int], int]) -> list[int]:
    """Apply learned merges (``ranks[pair] = merge index``) to one pre-tokenised piece."""
    ids = list(word)
    while len(ids) > 1:
        best_rank, best_pair = None, None
        for pair in zip(ids, ids[1:]):
            rank = ranks.get(pair)
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_pair = rank, pair
        if best_pair is None:
            break
        ids = _merge_pair(ids, best_pair[0], best_pair[1], NUM_BYTE_TOKENS + best_rank)
    return ids


def token_bytes_table(merges: Sequence[tuple[int, int]]) -> list[bytes]:
    """Return the byte string of every non-special token id (bytes, then merges)."""
    table = [bytes([i]) for i in range(NUM_BYTE_TOKENS)]
    for a, b in merges:
        table.append(table[a] + table[b])
    return table


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (for vocab strings)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(NUM_BYTE_TOKENS):
        if b not in mapping:
            mapping[b] = chr(NUM_BYTE_TOKENS + extra)
            extra += 1
    return mapping
