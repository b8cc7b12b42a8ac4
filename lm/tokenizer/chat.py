"""The chat template as code: conversations <-> token ids, with the loss mask for supervised fine-tuning.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`; an assistant
message may also carry `"thinking": str`, its reasoning, rendered between <|think_start|> and <|think_end|> before
the answer. (Thinking is never parsed out of `content`: text in any message is always plain text, even if it spells
`<think>` or a special token.) Rendering, with the loss mask under each piece:

    <|endoftext|>                                                   0   begin token: what pretraining put before
                                                                        every document, so a chat starts like one
    <|system_start|> system text <|system_end|>                     0   optional, first message only
    <|user_start|> user text <|user_end|>                           0
    <|assistant_start|>                                             0   the prompt for the answer, never learnt
    <|think_start|> thinking <|think_end|> answer <|assistant_end|> 1   (the think block only if "thinking" is set)
    ... then user / assistant alternate; a conversation ends with an assistant turn.

Every piece of text is encoded on its own with special tokens off, so text that spells `<|user_end|>` is ordinary
text and a turn's tokens never merge with a neighbour's. Padding uses <|pad|> (`pad_id`), never an end-of-turn id.
`HF_CHAT_TEMPLATE` is the same template in jinja for HF `apply_chat_template` (identical ids for conversations whose
text does not spell a special token: HF turns such text into the special token, we do not).
"""
from typing import NamedTuple, Sequence

from lm.tokenizer.base import ENDOFTEXT, Tokenizer

BEGIN = ENDOFTEXT
PAD = "<|pad|>"
SYSTEM_START, SYSTEM_END = "<|system_start|>", "<|system_end|>"
USER_START, USER_END = "<|user_start|>", "<|user_end|>"
ASSISTANT_START, ASSISTANT_END = "<|assistant_start|>", "<|assistant_end|>"
THINK_START, THINK_END = "<|think_start|>", "<|think_end|>"
ROLES = ("system", "user", "assistant")
_TURN_TOKENS = {"system": (SYSTEM_START, SYSTEM_END), "user": (USER_START, USER_END)}

# HF apply_chat_template with the same tokens (transformers renders with trim_blocks and lstrip_blocks; every tag
# here strips whitespace itself, so the output is exactly the tokens and texts). {% generation %} marks what we
# supervise, so `return_assistant_tokens_mask=True` gives our loss mask. Structure errors raise, as ours do.
HF_CHAT_TEMPLATE = (
    "{{- '" + BEGIN + "' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{- raise_exception('a system message may only come first') -}}{%- endif -%}"
    "{{- '" + SYSTEM_START + "' + message['content'] + '" + SYSTEM_END + "' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '" + USER_START + "' + message['content'] + '" + USER_END + "' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '" + ASSISTANT_START + "' -}}"
    "{%- generation -%}"
    "{%- if message['thinking'] is defined and message['thinking'] is not none -%}"
    "{{- '" + THINK_START + "' + message['thinking'] + '" + THINK_END + "' -}}"
    "{%- endif -%}"
    "{{- message['content'] + '" + ASSISTANT_END + "' -}}"
    "{%- endgeneration -%}"
    "{%- else -%}{{- raise_exception('unknown role ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT_START + "' -}}{%- endif -%}"
)


class ConversationError(ValueError):
    """A conversation that cannot be rendered; the message names it (file:line when it came from a file)."""


class Completion(NamedTuple):
    """Generated assistant ids split into parts. thinking is None when the ids do not open with <|think_start|>."""
    thinking: str | None
    answer: str
    ended: bool        # the assistant-end token was produced


def pad_id(tokenizer: Tokenizer) -> int:
    """The id that fills rows after a conversation (loss 0); <|pad|>, so never an end-of-turn or begin id."""
    return tokenizer.token_id(PAD)


def validate(messages, where: str = "conversation", need_answer: bool = True) -> None:
    """Raise ConversationError (naming `where`) unless messages are: optional system first, then user and
    assistant alternating from a user turn, string contents; with need_answer, ending in an assistant turn."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConversationError(f"{where}: expected a non-empty list of messages, got {_short(messages)}")
    expected = "user"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ConversationError(f"{where}: message {i} is not an object: {_short(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise ConversationError(f"{where}: message {i} has unknown role {role!r} (expected one of {ROLES})")
        if role == "system" and i != 0:
            raise ConversationError(f"{where}: message {i}: a system message may only come first")
        if role != "system" and role != expected:
            raise ConversationError(f"{where}: message {i} is {_article(role)} turn where {_article(expected)} "
                                    f"turn must come (turns alternate user, assistant, ...)")
        if not isinstance(message.get("content"), str):
            raise ConversationError(f"{where}: message {i} ({role}) content is not a string: "
                                    f"{_short(message.get('content'))}")
        thinking = message.get("thinking")
        if thinking is not None and (role != "assistant" or not isinstance(thinking, str)):
            raise ConversationError(f"{where}: message {i} ({role}): 'thinking' must be a string on an assistant turn")
        if role != "system":
            expected = "assistant" if role == "user" else "user"
    roles = [m["role"] for m in messages]
    if "user" not in roles:
        raise ConversationError(f"{where}: no user turn")
    if need_answer and "assistant" not in roles:
        raise ConversationError(f"{where}: no assistant turn (nothing to learn)")
    if need_answer and roles[-1] != "assistant":
        raise ConversationError(f"{where}: ends with a user turn after the last assistant turn")


def render_conversation(tokenizer: Tokenizer, messages, max_tokens: int | None = None,
                        where: str = "conversation") -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a whole conversation; mask 1 on the assistant's thinking, answer and end token.
    max_tokens cuts both lists to that length (the caller counts truncations)."""
    validate(messages, where)
    ids, mask = _render(tokenizer, messages)
    if max_tokens is not None:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask


def render_for_completion(tokenizer: Tokenizer, messages, where: str = "conversation") -> list[int]:
    """Ids of the prompt up to and including <|assistant_start|> of the next turn, for generation.
    A final assistant turn (e.g. a task's reference answer) is left out, so the model is asked to write it."""
    messages = list(messages)
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    validate(messages, where, need_answer=False)   # alternation then means it ends with a user turn
    ids, _ = _render(tokenizer, messages)
    return ids + [tokenizer.token_id(ASSISTANT_START)]


def render_answer(tokenizer: Tokenizer, answer: str, thinking: str | None = None) -> list[int]:
    """The ids an assistant turn supervises, after <|assistant_start|>: [think block] answer <|assistant_end|>."""
    special = tokenizer.token_id
    ids = []
    if thinking is not None:
        ids += [special(THINK_START), *tokenizer.encode(thinking), special(THINK_END)]
    return ids + tokenizer.encode(answer) + [special(ASSISTANT_END)]


def parse_completion(tokenizer: Tokenizer, ids: Sequence[int]) -> Completion:
    """Split generated ids (what follows <|assistant_start|>) into thinking and answer text.

    Everything after the first <|assistant_end|> is ignored. Thinking is the text between a leading <|think_start|>
    and the first <|think_end|>; with no <|think_end|> the whole completion is unfinished thinking and the answer is
    "". Any other special token inside is decoded as its name (so it stays visible to graders and readers).
    """
    ids = [int(i) for i in ids]
    end = tokenizer.token_id(ASSISTANT_END)
    ended = end in ids
    if ended:
        ids = ids[:ids.index(end)]
    think_start, think_end = tokenizer.token_id(THINK_START), tokenizer.token_id(THINK_END)
    if not ids or ids[0] != think_start:
        return Completion(None, tokenizer.decode(ids), ended)
    if think_end not in ids:
        return Completion(tokenizer.decode(ids[1:]), "", ended)
    split = ids.index(think_end)
    return Completion(tokenizer.decode(ids[1:split]), tokenizer.decode(ids[split + 1:]), ended)


THINKING, ANSWER = "thinking", "answer"


class CompletionStream:
    """Generated ids -> text pieces while they arrive, split as parse_completion splits the whole: `feed(id)` and
    `close()` return [(THINKING or ANSWER, text)]. Thinking is the text after a leading <|think_start|> up to
    <|think_end|> (`thinking` says the stream is inside it); multi-byte characters stay whole (the tokenizer's stream
    decoder holds a partial one back until close); ids in `hidden_ids` (stop tokens) are not shown. With
    `reasoning=False` every id is answer text (a base model's continuation)."""

    def __init__(self, tokenizer: Tokenizer, hidden_ids=(), reasoning: bool = True):
        self.decoder = tokenizer.stream_decoder()
        self.hidden_ids = set(hidden_ids)
        self.think_start = tokenizer.token_id(THINK_START) if reasoning else None
        self.think_end = tokenizer.token_id(THINK_END) if reasoning else None
        self.fed = 0
        self.thinking = False

    def feed(self, token: int) -> list[tuple[str, str]]:
        self.fed += 1
        if token in self.hidden_ids:
            return []
        if token == self.think_start and self.fed == 1:
            self.thinking = True
            return []
        if token == self.think_end and self.thinking:
            self.thinking = False
            return _piece(THINKING, self.decoder.flush())
        return _piece(self.part, self.decoder.feed(token))

    def close(self) -> list[tuple[str, str]]:
        """The text still held back (a partial character at the end)."""
        return _piece(self.part, self.decoder.flush())

    @property
    def part(self) -> str:
        return THINKING if self.thinking else ANSWER


def _piece(part: str, text: str) -> list[tuple[str, str]]:
    return [(part, text)] if text else []


def _render(tokenizer: Tokenizer, messages) -> tuple[list[int], list[int]]:
    special = tokenizer.token_id
    ids, mask = [special(BEGIN)], [0]

    def add(new_ids, loss: int):
        ids.extend(new_ids)
        mask.extend([loss] * len(new_ids))

    for message in messages:
        role = message["role"]
        if role == "assistant":
            add([special(ASSISTANT_START)], 0)
            add(render_answer(tokenizer, message["content"], message.get("thinking")), 1)
        else:
            start, end = _TURN_TOKENS[role]
            add([special(start), *tokenizer.encode(message["content"]), special(end)], 0)
    return ids, mask


def _article(role: str) -> str:
    return f"an {role}" if role == "assistant" else f"a {role}"


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
