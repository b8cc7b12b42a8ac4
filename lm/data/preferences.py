"""Preference pairs for the reward model and DPO: one prompt (our message list) and two answers, chosen and rejected.

Formats (jsonl / jsonl.gz lines or .json lists, read as lm.data.conversations reads them):

    {"chosen": str, "rejected": str}                  HH-RLHF transcripts: "\\n\\nHuman: ...\\n\\nAssistant: ..." turns;
                                                      the turns before the last Assistant turn are the shared prompt
    {"prompt", "chosen", "rejected"}                  prompt a string or a message list; answers strings or a list
                                                      holding one assistant message (TRL's conversational form)
    {"chosen": [messages], "rejected": [messages]}    whole conversations; all but their last assistant turns shared

A line whose two sides do not share their prompt, whose turns are out of order or empty, or whose answers are
identical is counted in ReadStats with file, line and reason. `split_pairs` splits by a seeded hash of the prompt, so
one prompt is never on both sides and the split does not depend on order. `tokenize_pairs` renders both sides with
the chat template into rows of seq_len + 1 ids (pad after); a pair with a side that does not fit whole is dropped and
counted, since a reward model reads its score at the final <|assistant_end|>.
"""
import dataclasses
import hashlib
import json
import re
from typing import Iterable, Iterator

import numpy as np

from lm.data.conversations import ReadStats, RecordError, check_conversation, json_files, read_json_records
from lm.tokenizer import chat
from lm.tokenizer.base import Tokenizer

HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    prompt: list          # messages ending with a user turn
    chosen: str           # the preferred final assistant answer
    rejected: str
    source: str = ""
    line: int = 0

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def chosen_messages(self) -> list:
        return [*self.prompt, {"role": "assistant", "content": self.chosen}]

    @property
    def rejected_messages(self) -> list:
        return [*self.prompt, {"role": "assistant", "content": self.rejected}]


# -- formats ---------------------------------------------------------------------------------------------------------
def hh_messages(transcript: str) -> list[dict]:
    """An HH-RLHF transcript as messages; RecordError unless it is Human/Assistant turns from a Human turn."""
    if not isinstance(transcript, str):
        raise RecordError(f"transcript is not a string: {type(transcript).__name__}")
    parts = HH_TURN.split(transcript)
    if parts[0].strip():
        raise RecordError(f"text before the first '\\n\\nHuman:' turn: {parts[0][:60]!r}")
    return [{"role": HH_ROLES[speaker], "content": text.strip()} for speaker, text in zip(parts[1::2], parts[2::2])]


def record_pair(record) -> tuple[str, list, str, str]:
    """(format, prompt, chosen, rejected) of one record; RecordError says why not."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        keys = sorted(record)[:10] if isinstance(record, dict) else type(record).__name__
        raise RecordError(f"unknown format: {keys} (expected chosen and rejected)")
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" in record:
        prompt = record["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return "prompt_chosen_rejected", prompt, _answer(chosen, "chosen"), _answer(rejected, "rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        kind, chosen, rejected = "hh_rlhf", hh_messages(chosen), hh_messages(rejected)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        kind = "messages"
    else:
        raise RecordError("chosen and rejected must both be transcripts (strings) or both message lists")
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            raise RecordError(f"{side} does not end with an assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise RecordError("prompts differ: chosen and rejected do not share the turns before their last answer")
    return kind, chosen[:-1], chosen[-1].get("content"), rejected[-1].get("content")


def _answer(value, side: str):
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant":
        return value[0].get("content")
    if isinstance(value, str):
        return value
    raise RecordError(f"{side}: expected a string or a list of one assistant message")


def check_pair(prompt, chosen, rejected, where: str) -> None:
    for answer in (chosen, rejected):
        check_conversation([*prompt, {"role": "assistant", "content": answer}], where)
    if chosen == rejected:
        raise RecordError("identical answers: chosen == rejected")


# -- the reader ------------------------------------------------------------------------------------------------------
def read_pairs(paths_or_globs, stats: ReadStats | None = None) -> Iterator[PreferencePair]:
    """Every valid pair of the files in order; pass a ReadStats to see what was rejected and why."""
    stats = ReadStats() if stats is None else stats
    for path in json_files(paths_or_globs):
        for line, record in read_json_records(path, stats):
            try:
                kind, prompt, chosen, rejected = record_pair(record)
                check_pair(prompt, chosen, rejected, f"{path}:{line}")
            except RecordError as error:
                stats.reject(path, line, str(error))
                continue
            stats.by_format[kind] += 1
            stats.kept += 1
            yield PreferencePair(prompt, chosen, rejected, str(path), line)


def load_pairs(paths_or_globs) -> tuple[list[PreferencePair], ReadStats]:
    stats = ReadStats()
    return list(read_pairs(paths_or_globs, stats)), stats


def split_pairs(pairs: Iterable[PreferencePair], held_out_fraction: float = 0.1,
                seed: int = 0) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held_out): a pair is held out when a seeded hash of its prompt falls below held_out_fraction."""
    if not 0 <= held_out_fraction <= 1:
        raise ValueError(f"held_out_fraction={held_out_fraction}: must be in [0, 1]")
    train, held_out = [], []
    for pair in pairs:
        key = json.dumps([seed, pair.prompt], sort_keys=True).encode()
        fraction = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2 ** 64
        (held_out if fraction < held_out_fraction else train).append(pair)
    return train, held_out


# -- rows ------------------------------------------------------------------------------------------------------------
def tokenize_pairs(tokenizer: Tokenizer, pairs: Iterable[PreferencePair], seq_len: int) -> dict:
    """Both sides of each pair in rows, pair i in row i of each side:

    {"chosen_ids", "rejected_ids": int32 [n, seq_len + 1] (padded with <|pad|>),
     "chosen_mask", "rejected_mask": float32 [n, seq_len] (the answer's targets, as in SFT rows),
     "chosen_lengths", "rejected_lengths": int32 [n] (the last real token, <|assistant_end|>, is at length - 1),
     "stats": {...}}
    """
    pad = chat.pad_id(tokenizer)
    sides = {"chosen": ([], [], []), "rejected": ([], [], [])}
    stats = dict(pairs=0, rows=0, dropped_too_long=0)
    for pair in pairs:
        stats["pairs"] += 1
        rendered = {side: chat.render_conversation(tokenizer, getattr(pair, f"{side}_messages"), where=pair.where)
                    for side in sides}
        if max(len(ids) for ids, _ in rendered.values()) > seq_len + 1:
            stats["dropped_too_long"] += 1
            continue
        for side, (ids, mask) in rendered.items():
            row = np.full(seq_len + 1, pad, np.int32)
            row[:len(ids)] = ids
            row_mask = np.zeros(seq_len, np.float32)
            row_mask[:len(ids) - 1] = mask[1:]
            for out, value in zip(sides[side], (row, row_mask, len(ids))):
                out.append(value)
        stats["rows"] += 1
    result = {"stats": stats}
    for side, (ids, masks, lengths) in sides.items():
        result[f"{side}_ids"] = np.stack(ids) if ids else np.zeros((0, seq_len + 1), np.int32)
        result[f"{side}_mask"] = np.stack(masks) if masks else np.zeros((0, seq_len), np.float32)
        result[f"{side}_lengths"] = np.asarray(lengths, np.int32)
    return result
