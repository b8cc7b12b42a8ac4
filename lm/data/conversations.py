"""Conversations for supervised fine-tuning: read them in the formats people have (training data: see the end).

Formats (one JSON record per line of .jsonl / .jsonl.gz, or the items of a .json / .json.gz list), told apart by
their keys, each turned into our message lists (see lm.tokenizer.chat):

    [{"role", "content"}, ...]                      a bare message list (nanochat's identity conversations)
    {"messages": [{"role", "content"}, ...]}        OpenAI / HF chat; content may be a list of {"type": "text"} parts
    {"conversations": [{"from", "value"}, ...]}     ShareGPT: from human | user, gpt | assistant | chatgpt, system
    {"instruction", "input"?, "output"}             Alpaca: user = instruction, then input after a blank line
    {"instruction", "instances": [{"input", "output"}]}   self-instruct: one conversation per instance
    {"prompt", "response" | "completion"}           prompt/response pairs

An assistant message may carry "thinking" (or "reasoning_content"). A record that is not JSON, matches no format, or
is not a valid conversation (no assistant turn, unknown role, turns out of order, empty answer) is counted in
ReadStats with file, line and reason; nothing is skipped silently. ("line" is the 1-based line of a .jsonl file and
the 1-based item of a .json list.) MT-Bench style {"turns": [...]} records are prompts without answers: counted as
rejected for training with their own reason.

Training data: lm.data.tokenize.write_conversations renders each conversation with lm.tokenizer.chat's
render_conversation into the pretraining token shards plus a loss-mask stream (1 on the assistant's tokens), one
conversation per document; lm.data.pipeline's `document` packing reads them back one conversation per row from its
first token, padded with <|pad|> (loss 0), so a conversation never attends to another (the model has no segment ids),
and the rows of step s are a pure function of (seed, s, process) through the pipeline's seeded Feistel
permutation: exact resume, as in pretraining. lm.train.sft writes the shards once into its run directory and reads
them back on resume, so a resumed run trains on the very tokens the first one did.
"""
import collections
import dataclasses
import pathlib
from typing import Iterator

from lm.data import readers
from lm.data.readers import expand_inputs
from lm.tokenizer import chat

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system"}
JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson")


class RecordError(ValueError):
    """A record that is not a usable conversation (or preference pair); its text is the rejection reason."""


@dataclasses.dataclass(frozen=True)
class Conversation:
    messages: list
    source: str      # file
    line: int        # 1-based line (jsonl) or item (json list)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclasses.dataclass
class ReadStats:
    """What was read: records, what they gave, and every rejection (the first max_examples kept in full)."""
    files: int = 0
    records: int = 0
    kept: int = 0                   # conversations (or pairs) yielded
    rejected: int = 0
    utf8_replaced: int = 0          # records kept with U+FFFD in place of invalid UTF-8 (lm.data.readers)
    by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    by_format: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list = dataclasses.field(default_factory=list)   # (source, line, reason)
    max_examples: int = 1000

    def reject(self, source, line: int, reason: str) -> None:
        self.rejected += 1
        self.by_reason[reason.split(":")[0]] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append((str(source), line, reason))

    def to_dict(self) -> dict:
        return dict(files=self.files, records=self.records, kept=self.kept, rejected=self.rejected,
                    utf8_replaced=self.utf8_replaced,
                    by_reason=dict(self.by_reason), by_format=dict(self.by_format),
                    examples=[dict(source=s, line=n, reason=r) for s, n, r in self.examples])

    def summary(self) -> str:
        reasons = ", ".join(f"{r}: {n}" for r, n in self.by_reason.most_common()) or "none"
        formats = ", ".join(f"{f}: {n}" for f, n in self.by_format.most_common()) or "none"
        return (f"{self.kept} kept from {self.records} records in {self.files} files ({formats}); "
                f"{self.rejected} rejected ({reasons})")


# -- reading JSON records --------------------------------------------------------------------------------------------
BAD_JSON_REASONS = {"malformed_json": "malformed JSON", "truncated_or_unreadable": "unreadable file"}


def read_json_records(path, stats: ReadStats) -> Iterator[tuple[int, object]]:
    """(line, value) of every record of a .jsonl(.gz) file or .json(.gz) list, read by lm.data.readers.json_records
    (the one reader of JSON records); what it cannot read is rejected in stats with file and line."""
    stats.files += 1
    for item in readers.json_records(path):
        if isinstance(item, readers.Bad):
            reason = BAD_JSON_REASONS.get(item.reason, item.reason)
            if item.reason == "malformed_json" and item.line == 0:
                reason += " list"
            elif item.reason == "malformed_json":
                stats.records += 1
            stats.reject(path, item.line, f"{reason}: {item.detail}")
            continue
        stats.records += 1
        stats.utf8_replaced += item.utf8_replaced
        yield item.line, item.value


def json_files(paths_or_globs) -> list[pathlib.Path]:
    files = [pathlib.Path(f) for f in expand_inputs(paths_or_globs)]
    unknown = [str(p) for p in files if not p.name.lower().endswith(JSON_SUFFIXES)]
    if unknown:
        raise ValueError(f"not JSON / JSON-lines files ({', '.join(JSON_SUFFIXES)}): {unknown[:5]}")
    return files


# -- formats ---------------------------------------------------------------------------------------------------------
def record_conversations(record) -> tuple[str, list[list[dict]]]:
    """(format name, message lists) of one record in any known format; RecordError says why not."""
    if isinstance(record, list):
        return "messages", [_messages(record)]
    if not isinstance(record, dict):
        raise RecordError(f"not a JSON object or list: {type(record).__name__}")
    if "messages" in record:
        return "messages", [_messages(record["messages"])]
    if "conversations" in record:
        return "sharegpt", [_sharegpt(record["conversations"])]
    if "instruction" in record and "instances" in record:
        instances = record["instances"]
        if not isinstance(instances, list) or not instances:
            raise RecordError("self-instruct record: 'instances' is not a non-empty list")
        return "self_instruct", [_alpaca(record["instruction"], _get(i, "input", ""), _get(i, "output"))
                                 for i in instances]
    if "instruction" in record and "output" in record:
        return "alpaca", [_alpaca(record["instruction"], record.get("input") or "", record["output"])]
    if "prompt" in record and ("response" in record or "completion" in record):
        answer = record["response"] if "response" in record else record["completion"]
        return "prompt_response", [[{"role": "user", "content": record["prompt"]},
                                    {"role": "assistant", "content": answer}]]
    if "turns" in record:
        raise RecordError("prompts only: MT-Bench style 'turns' without assistant answers")
    raise RecordError(f"unknown format: keys {sorted(record)[:10]} (expected messages, conversations, "
                      f"instruction/output, instruction/instances or prompt/response)")


def _get(value, key, default=None):
    if not isinstance(value, dict):
        raise RecordError(f"expected an object with {key!r}, got {type(value).__name__}")
    if key not in value and default is None:
        raise RecordError(f"missing key {key!r}")
    return value.get(key, default)


def _text(content):
    """A message's text: a string, or the concatenated text of OpenAI-style content parts."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return content   # anything else is checked (and rejected) by chat.validate


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list):
        raise RecordError(f"'messages' is not a list: {type(messages).__name__}")
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise RecordError(f"a message is not an object: {type(message).__name__}")
        converted = {"role": message.get("role"), "content": _text(message.get("content"))}
        thinking = message.get("thinking", message.get("reasoning_content"))
        if thinking is not None:
            converted["thinking"] = thinking
        out.append(converted)
    return out


def _sharegpt(turns) -> list[dict]:
    if not isinstance(turns, list):
        raise RecordError(f"'conversations' is not a list: {type(turns).__name__}")
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise RecordError(f"a ShareGPT turn is not an object: {type(turn).__name__}")
        speaker = turn.get("from", turn.get("role"))
        if speaker not in SHAREGPT_ROLES:
            raise RecordError(f"unknown ShareGPT speaker {speaker!r} (known: {sorted(SHAREGPT_ROLES)})")
        out.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value", turn.get("content"))})
    return out


def _alpaca(instruction, input_text, output) -> list[dict]:
    if not all(isinstance(v, str) for v in (instruction, input_text, output)):
        raise RecordError("instruction, input and output must be strings")
    prompt = f"{instruction}\n\n{input_text}" if input_text.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def check_conversation(messages, where: str) -> None:
    """chat.validate plus what training needs of data: no empty user or assistant text (RecordError)."""
    try:
        chat.validate(messages, where)
    except chat.ConversationError as error:
        raise RecordError(f"invalid conversation: {str(error).removeprefix(where + ': ')}") from None
    for i, message in enumerate(messages):
        if message["role"] != "system" and not message["content"].strip() and not message.get("thinking"):
            raise RecordError(f"invalid conversation: message {i} ({message['role']}) is empty")


# -- the reader ------------------------------------------------------------------------------------------------------
def read_conversations(paths_or_globs, stats: ReadStats | None = None) -> Iterator[Conversation]:
    """Every valid conversation of the files in order; pass a ReadStats to see what was rejected and why."""
    stats = ReadStats() if stats is None else stats
    for path in json_files(paths_or_globs):
        for line, record in read_json_records(path, stats):
            where = f"{path}:{line}"
            try:
                kind, conversations = record_conversations(record)
                for messages in conversations:
                    check_conversation(messages, where)
            except RecordError as error:
                stats.reject(path, line, str(error))
                continue
            stats.by_format[kind] += 1
            for messages in conversations:
                stats.kept += 1
                yield Conversation(messages, str(path), line)


def load_conversations(paths_or_globs) -> tuple[list[Conversation], ReadStats]:
    stats = ReadStats()
    return list(read_conversations(paths_or_globs, stats)), stats
