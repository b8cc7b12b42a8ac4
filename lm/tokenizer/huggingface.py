"""Export a tiktoken-rank vocabulary as an HF `tokenizers` tokenizer that gives the same ids."""
import re

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from lm.tokenizer.base import byte_to_unicode


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of every token into two tokens, ordered by the merged token's rank.

    tiktoken merges any adjacent pair whose concatenation is a token (lowest rank first), not only the pair
    training happened to merge, so HF needs all splits to reach the same tokens.
    """
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges.extend(sorted(splits, key=lambda pair: (ranks[pair[0]], ranks[pair[1]])))
    return merges


def hf_pattern(pattern: str) -> str:
    """The split pattern for Oniguruma: `{1,3}+` is possessive in tiktoken's regex but "one or more" in Onig's
    Ruby syntax. Dropping the `+` keeps the meaning, since nothing after it in the branch could backtrack into it."""
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern)


def to_hf(tokenizer) -> HFTokenizer:
    """A TiktokenTokenizer (its mergeable_ranks, pattern, special_tokens) as byte-level BPE with the same ranks as
    ids; special tokens sit in the model vocab too so HF keeps their ids."""
    b2u = byte_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(b2u[b] for b in token)

    vocab = {as_text(token): rank for token, rank in tokenizer.mergeable_ranks.items()}
    clashes = set(vocab) & set(tokenizer.special_tokens)
    if clashes:
        raise ValueError(f"special tokens {sorted(clashes)} are also ordinary tokens of {tokenizer.name}")
    vocab.update(tokenizer.special_tokens)
    merges = [(as_text(a), as_text(b)) for a, b in merges_from_ranks(tokenizer.mergeable_ranks)]
    # ignore_merges: a pre-split piece that is itself a token is taken whole, as tiktoken does.
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(hf_pattern(tokenizer.pattern)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in tokenizer.special_tokens])
    return hf
