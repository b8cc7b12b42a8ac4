"""The one tokenizer interface every stage uses, whatever the backend (tiktoken ranks or sentencepiece)."""
import codecs
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Collection, Iterable, Literal

ENDOFTEXT = "<|endoftext|>"
# Reserved for the chat template (SFT) and reasoning traces (RL). Order fixes their ids: never reorder, only append.
CHAT_SPECIAL_TOKENS = (
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|system_start|>", "<|system_end|>",
    "<|think_start|>", "<|think_end|>",
    "<|pad|>",
)
SPECIAL_TOKENS = (ENDOFTEXT,) + CHAT_SPECIAL_TOKENS

AllowedSpecial = Literal["all"] | Collection[str]


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back bytes of a character split across tokens."""

    def __init__(self, tokenizer: "Tokenizer"):
        self._token_bytes = tokenizer.token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: int | Iterable[int]) -> str:
        """Text completed by these ids ("" while a character is still incomplete)."""
        if isinstance(ids, int):
            ids = (ids,)
        return self._utf8.decode(b"".join(self._token_bytes(i) for i in ids))

    def flush(self) -> str:
        """Whatever is still buffered (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """Text <-> token ids. Special tokens are never produced from text unless the caller allows them."""

    name: str
    special_tokens: dict[str, int]

    # -- what a backend implements --------------------------------------------------------------------------------
    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    @property
    def n_vocab(self) -> int:
        raise NotImplementedError

    @property
    def hash(self) -> str:
        """sha256 of everything that decides the ids (vocabulary, split pattern, special tokens)."""
        raise NotImplementedError

    def save(self, directory, meta: dict | None = None) -> None:
        """Write the vocabulary into directory; `meta` adds entries to its tokenizer.meta.json."""
        raise NotImplementedError

    # -- shared behaviour -----------------------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.token_bytes(i) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def encode_batch(self, texts: Iterable[str], allowed_special: AllowedSpecial = (),
                     num_threads: int = 8) -> list[list[int]]:
        with ThreadPoolExecutor(num_threads) as pool:
            return list(pool.map(lambda text: self.encode(text, allowed_special), texts))

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def token_id(self, name: str) -> int:
        """Id of a special token by name, e.g. token_id("<|assistant_start|>")."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a special token of {self.name}; it has {sorted(self.special_tokens)}")

    @property
    def eot_id(self) -> int:
        return self.token_id(ENDOFTEXT)

    def allowed_set(self, allowed_special: AllowedSpecial) -> set[str]:
        """The named special tokens as a set, rejecting names this vocabulary lacks."""
        if allowed_special == "all":
            return set(self.special_tokens)
        allowed = set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"unknown special tokens {sorted(unknown)} for {self.name}")
        return allowed

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n_vocab={self.n_vocab})"


def with_reserved_specials(special_tokens: dict[str, int], first_free_id: int) -> dict[str, int]:
    """The vocabulary's own special tokens plus our reserved ones it lacks, appended from first_free_id in order."""
    specials = dict(special_tokens)
    next_id = max([first_free_id - 1, *specials.values()]) + 1
    for name in SPECIAL_TOKENS:
        if name not in specials:
            specials[name] = next_id
            next_id += 1
    return specials


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (used by encoder.json and HF byte-level vocabularies)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    mapping = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in mapping)
    mapping.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return dict(sorted(mapping.items()))


def byte_level_ranks(vocab: dict[str, int], source, skip=()) -> dict[bytes, int]:
    """A byte-level vocabulary (GPT-2's encoder.json, an HF tokenizer.json's model.vocab: printable-character
    tokens -> id) as tiktoken ranks (token bytes -> id), leaving out the tokens in `skip` (its special tokens);
    a character outside the byte alphabet is an error naming `source`."""
    unicode_to_byte = {c: b for b, c in byte_to_unicode().items()}
    try:
        return {bytes(unicode_to_byte[c] for c in token): i for token, i in vocab.items() if token not in skip}
    except KeyError as error:
        raise ValueError(f"{source}: a token with a character outside the byte-level alphabet: {error}") from None
