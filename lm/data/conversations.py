"""Conversations for supervised fine-tuning: read them in the formats people have, turn them into training rows.

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

Training rows (`tokenize_conversations`) hold ONE conversation each: a row of seq_len + 1 ids starts with the
conversation and is padded with <|pad|>, loss 0 on padding, so a conversation never attends to another (the model
has no segment ids; packing several per row would need them). A conversation longer than the row is cut at
seq_len + 1 tokens and counted; one with no supervised token left after the cut is dropped and counted.
`sft_batch` gives the rows of step s as a pure function of (seed, s, process), through the pretraining pipeline's
seeded Feistel permutation, so resuming needs no iterator state; `eval_batches` gives held-out rows in order.

Why rows in memory (and in one .npz file, `save_rows` / `load_rows`) rather than token + loss-mask shards read back
through lm.data.pipeline: SFT data is conversation-sized (10^3-10^6 conversations of a few hundred tokens: megabytes
to a few GB as int32 rows, no corpus-sized stream), and a row here already IS what `document` packing makes of a
shard (one conversation from its first token, padded), so shards would add an index, a mask stream and tf.data
for the same batches. What matters for exact resume is that a resumed run reads the very rows the first one
trained on, even if the generators, the tokenizer code or the input files changed since: lm.train.sft writes the
rows once into its run directory and reads that file back on resume. The batch order is the pipeline's Feistel
permutation, so the rule "data order is a pure function of (seed, step, process)" is the same as in pretraining.
"""
import collections
import dataclasses
import json
import pathlib
from typing import Iterable, Iterator

import numpy as np

from lm.data import pipeline
from lm.data import readers
from lm.data.readers import expand_inputs
from lm.tokenizer import chat
from lm.tokenizer.base import Tokenizer

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


# -- training rows ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SFTRows:
    """One conversation per row. ids: int32 [n, seq_len + 1] (pad after the conversation); loss_mask: float32
    [n, seq_len], aligned with the targets ids[:, 1:]; lengths: tokens of each row's conversation (after any cut)."""
    ids: np.ndarray
    loss_mask: np.ndarray
    lengths: np.ndarray
    where: list                       # file:line of each row
    stats: dict

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def seq_len(self) -> int:
        return self.loss_mask.shape[1]

    def select(self, indices) -> "SFTRows":
        """The rows at `indices`, in that order (stats are those of the whole set)."""
        indices = np.asarray(indices, np.int64)
        return SFTRows(self.ids[indices], self.loss_mask[indices], self.lengths[indices],
                       [self.where[i] for i in indices], self.stats)


def save_rows(rows: SFTRows, path) -> None:
    """Writes rows to one .npz file (atomically: a half-written file never replaces a complete one)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, ids=rows.ids, loss_mask=rows.loss_mask, lengths=rows.lengths,
                 where=np.asarray(json.dumps(rows.where)), stats=np.asarray(json.dumps(rows.stats)))
    tmp.replace(path)


def load_rows(path) -> SFTRows:
    """The rows `save_rows` wrote (no pickle)."""
    with np.load(path, allow_pickle=False) as data:
        return SFTRows(data["ids"], data["loss_mask"], data["lengths"], json.loads(str(data["where"])),
                       json.loads(str(data["stats"])))


def tokenize_conversations(tokenizer: Tokenizer, conversations: Iterable, seq_len: int) -> SFTRows:
    """Render each conversation (a Conversation or a message list) into its own row of seq_len + 1 ids."""
    pad = chat.pad_id(tokenizer)
    ids_rows, mask_rows, lengths, wheres = [], [], [], []
    counts = dict.fromkeys(("conversations", "truncated", "dropped_no_supervised_token", "tokens",
                            "supervised_tokens", "supervised_tokens_before_cut"), 0)
    for n, conversation in enumerate(conversations):
        messages, where = ((conversation.messages, conversation.where) if isinstance(conversation, Conversation)
                           else (conversation, f"conversation {n}"))
        ids, mask = chat.render_conversation(tokenizer, messages, where=where)
        counts["conversations"] += 1
        counts["supervised_tokens_before_cut"] += sum(mask[1:])
        if len(ids) > seq_len + 1:
            counts["truncated"] += 1
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        target_mask = mask[1:]           # the loss of target t is the mask of token t + 1
        if not any(target_mask):
            counts["dropped_no_supervised_token"] += 1
            continue
        row = np.full(seq_len + 1, pad, np.int32)
        row[:len(ids)] = ids
        row_mask = np.zeros(seq_len, np.float32)
        row_mask[:len(target_mask)] = target_mask
        ids_rows.append(row)
        mask_rows.append(row_mask)
        lengths.append(len(ids))
        wheres.append(where)
        counts["tokens"] += len(ids)
        counts["supervised_tokens"] += int(sum(target_mask))
    rows = len(ids_rows)
    stats = dict(counts, rows=rows, seq_len=seq_len, pad_id=pad,
                 padding_fraction=round(1 - counts["tokens"] / (rows * (seq_len + 1)), 4) if rows else 0.0)
    return SFTRows(np.stack(ids_rows) if rows else np.zeros((0, seq_len + 1), np.int32),
                   np.stack(mask_rows) if rows else np.zeros((0, seq_len), np.float32),
                   np.asarray(lengths, np.int32), wheres, stats)


def sft_batch(rows: SFTRows, step: int, global_batch: int, seed: int, process_index: int = 0,
              process_count: int = 1) -> dict:
    """This process's rows of training step `step`: {"inputs", "targets": int32 [B, seq_len], "loss_mask"}.
    Each epoch over the rows is one seeded permutation (the pretraining pipeline's), so the order is a pure
    function of (seed, step, process) and resuming needs no state."""
    if len(rows) == 0:
        raise ValueError("no training rows: every conversation was dropped (see SFTRows.stats)")
    local = pipeline.local_rows(global_batch, process_index, process_count)
    picked = pipeline.train_window_ids(step, len(rows), global_batch, seed, local)
    ids = rows.ids[picked]
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": rows.loss_mask[picked]}



def eval_batches(rows: SFTRows, batch_size: int, process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """This process's rows of every held-out batch, in row order, each row once; the last batch is filled with
    padding rows (loss_mask 0), so every batch has the same shape and every process runs the same number."""
    local = pipeline.local_rows(batch_size, process_index, process_count)
    pad = rows.stats.get("pad_id", 0)
    for start in range(0, len(rows), batch_size):
        picked = start + local
        valid = picked < len(rows)
        ids = np.where(valid[:, None], rows.ids[np.where(valid, picked, 0)], pad).astype(np.int32)
        mask = np.where(valid[:, None], rows.loss_mask[np.where(valid, picked, 0)], 0).astype(np.float32)
        yield {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask}
