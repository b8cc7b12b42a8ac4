"""One choice's generated tokens as text while they arrive: reasoning apart from content, stop tokens hidden, and
OpenAI `stop` strings cut (text that may be the start of a stop string is held back until it is known not to be)."""
from lm.tokenizer import chat as template

CONTENT, REASONING = "content", "reasoning_content"


class ChoiceText:
    """feed(token) -> [(field, text)] deltas, field CONTENT or REASONING; close() -> the rest.

    The split into thinking and answer is lm.tokenizer.chat.CompletionStream's (with `reasoning`, a completion that
    opens with <|think_start|> is thinking up to <|think_end|>, streamed as REASONING; everything else is CONTENT).
    Stop strings apply to the content; `hit_stop` says one was found (the content ends before it; later tokens are
    ignored).
    """

    def __init__(self, tokenizer, hidden_ids=(), stops=(), reasoning: bool = True):
        self.parts = template.CompletionStream(tokenizer, hidden_ids, reasoning)
        self.stops = [s for s in stops if s]
        self.tokens: list[int] = []     # every token fed (what usage counts), stop token included
        self.content = ""               # the content so far (after a stop string: up to it)
        self.sent = 0                   # characters of content already returned as deltas
        self.hit_stop = False

    def feed(self, token: int) -> list[tuple[str, str]]:
        self.tokens.append(token)
        return [] if self.hit_stop else self._deltas(self.parts.feed(token))

    def close(self) -> list[tuple[str, str]]:
        """What is still held back (a partial character, text that looked like the start of a stop string)."""
        return [] if self.hit_stop else self._deltas(self.parts.close(), final=True)

    def _deltas(self, pieces, final: bool = False) -> list[tuple[str, str]]:
        out = []
        for part, text in pieces:
            out += _delta(REASONING, text) if part == template.THINKING else self._add_content(text)
        if final:
            out += self._add_content("", final=True)
        return out

    def _add_content(self, text: str, final: bool = False) -> list[tuple[str, str]]:
        self.content += text
        cut = cut_at_stop(self.content, self.stops)
        if len(cut) < len(self.content):
            self.content, self.hit_stop = cut, True
        held = 0 if final or self.hit_stop else _partial_stop(self.content, self.stops)
        out = self.content[self.sent:len(self.content) - held]
        self.sent += len(out)
        return _delta(CONTENT, out)


def cut_at_stop(text: str, stops) -> str:
    """`text` up to the first occurrence of any stop string (all of it when none occurs)."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[:min(found)] if found else text


def _partial_stop(text: str, stops) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string (it may become one)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def _delta(field: str, text: str) -> list[tuple[str, str]]:
    return [(field, text)] if text else []
