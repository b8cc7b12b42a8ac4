"""Readable pure-Python byte-level BPE: for teaching, and as the oracle the fast trainer and encoder are tested against.

Training (the seed's algorithm): split text into chunks with the regex, write each chunk as its UTF-8 bytes (ids
0..255), count adjacent pairs, merge the most frequent pair into a new id 256, 257, ... and repeat. Ties go to the
smallest pair, as in rustbpe, so both produce the same merges.
"""
import collections
import heapq
from typing import Iterable

import regex

Pair = tuple[int, int]


def chunk_counts(texts: Iterable[str], pattern: str) -> collections.Counter:
    """How often each regex chunk occurs, as tuples of byte ids."""
    split = regex.compile(pattern)
    counts = collections.Counter()
    for text in texts:
        counts.update(split.findall(text))
    return collections.Counter({tuple(chunk.encode("utf-8")): n for chunk, n in counts.items()})


def merge(ids: list[int], pair: Pair, new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of pair (left to right) with new_id."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _most_frequent(counts: dict[Pair, int]) -> Pair:
    return min(counts, key=lambda pair: (-counts[pair], pair))


def train_naive(texts: Iterable[str], vocab_size: int, pattern: str) -> list[Pair]:
    """Recount every pair after every merge: short and obviously right, slow. Returns merges in order."""
    words = [(list(word), n) for word, n in chunk_counts(texts, pattern).items()]
    merges = []
    while len(merges) < vocab_size - 256:
        counts = collections.Counter()
        for ids, n in words:
            for pair in zip(ids, ids[1:]):
                counts[pair] += n
        if not counts:
            break
        pair = _most_frequent(counts)
        merges.append(pair)
        words = [(merge(ids, pair, 255 + len(merges)), n) for ids, n in words]
    return merges


def train(texts: Iterable[str], vocab_size: int, pattern: str) -> list[Pair]:
    """The same merges as train_naive, with pair counts updated incrementally and a lazily refreshed max-heap."""
    chunks = chunk_counts(texts, pattern)
    words, freq = [list(word) for word in chunks], list(chunks.values())
    counts = collections.Counter()
    where = collections.defaultdict(set)   # pair -> indices of words that may contain it
    for index, ids in enumerate(words):
        for pair in zip(ids, ids[1:]):
            counts[pair] += freq[index]
            where[pair].add(index)
    heap = [(-count, pair) for pair, count in counts.items()]
    heapq.heapify(heap)
    merges = []
    while heap and len(merges) < vocab_size - 256:
        negative_count, pair = heapq.heappop(heap)
        if counts[pair] <= 0:
            continue
        if -negative_count != counts[pair]:   # stale entry: requeue with its current count
            heapq.heappush(heap, (-counts[pair], pair))
            continue
        new_id = 256 + len(merges)
        merges.append(pair)
        created = set()
        for index in where.pop(pair):
            ids = words[index]
            for old in zip(ids, ids[1:]):
                counts[old] -= freq[index]
            words[index] = ids = merge(ids, pair, new_id)
            for new in zip(ids, ids[1:]):
                counts[new] += freq[index]
                where[new].add(index)
                if new_id in new:
                    created.add(new)
        # Only pairs containing new_id can have grown; the others shrank and are refreshed when popped.
        for new in created:
            heapq.heappush(heap, (-counts[new], new))
    return merges


def merges_to_ranks(merges: list[Pair]) -> dict[bytes, int]:
    """tiktoken-style mergeable ranks: the 256 bytes, then each merged token's bytes at its id."""
    vocab = {i: bytes([i]) for i in range(256)}
    for new_id, (a, b) in enumerate(merges, 256):
        vocab[new_id] = vocab[a] + vocab[b]
    return {token: i for i, token in vocab.items()}


def encode(text: str, merges: list[Pair], pattern: str) -> list[int]:
    """The seed's encoder: in each chunk, keep applying the earliest-learned merge present."""
    order = {pair: 256 + i for i, pair in enumerate(merges)}
    out = []
    for chunk in regex.findall(pattern, text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: order.get(p, float("inf")))
            if pair not in order:
                break
            ids = merge(ids, pair, order[pair])
        out.extend(ids)
    return out


def bpe_split(piece: bytes, ranks: dict[bytes, int], max_rank: int | None = None) -> list[bytes]:
    """tiktoken's rule on one piece: merge the adjacent pair whose concatenation has the lowest rank (< max_rank).

    bpe_split(token, ranks, max_rank=ranks[token]) gives the two parts a merged token was built from.
    """
    parts = [bytes([b]) for b in piece]
    limit = float("inf") if max_rank is None else max_rank
    while len(parts) > 1:
        candidates = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(candidates)
        if rank >= limit:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def decode(ids: list[int], ranks: dict[bytes, int]) -> bytes:
    vocab = {i: token for token, i in ranks.items()}
    return b"".join(vocab[i] for i in ids)
