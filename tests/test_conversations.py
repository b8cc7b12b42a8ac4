"""Conversation data: every format to our message lists, bad lines counted with file:line. (Their token + loss-mask
shards: tests/test_tokenize.py; one conversation per row: tests/test_pipeline.py.)"""
import gzip
import json

import pytest

from lm.data import conversations
from lm.tokenizer import chat
from tests.conftest import shared_path
from tests.test_chat_template import bpe_tokenizer

HI = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def write_lines(path, lines):
    data = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def test_every_format_becomes_the_same_messages(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl.gz", [
        HI,
        {"messages": HI},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]},
                      {"role": "assistant", "content": "hello"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"instruction": "hi", "input": "", "output": "hello"},
        {"instruction": "hi", "instances": [{"input": "", "output": "hello"}, {"input": "", "output": "hello"}]},
        {"prompt": "hi", "response": "hello"},
        {"prompt": "hi", "completion": "hello"},
    ])
    found, stats = conversations.load_conversations(path)
    assert [c.messages for c in found] == [HI] * 9
    assert [c.line for c in found] == [1, 2, 3, 4, 5, 6, 6, 7, 8]
    assert stats.rejected == 0 and stats.records == 8 and stats.kept == 9
    assert dict(stats.by_format) == {"messages": 3, "sharegpt": 1, "alpaca": 1, "self_instruct": 1,
                                     "prompt_response": 2}


def test_system_input_and_thinking_are_kept(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                           {"from": "gpt", "value": "a"}]},
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "thinking": "t"}]},
        {"messages": [{"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a", "reasoning_content": "r"}]},
    ])
    found, _ = conversations.load_conversations(path)
    assert found[0].messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                                 {"role": "assistant", "content": "a"}]
    assert found[1].messages[0] == {"role": "user", "content": "Translate.\n\nchat"}
    assert found[2].messages[1] == {"role": "assistant", "content": "a", "thinking": "t"}
    assert found[3].messages[1] == {"role": "assistant", "content": "a", "thinking": "r"}


def test_malformed_lines_are_counted_with_file_line_and_reason(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [
        {"messages": HI},                                                          # 1 good
        '{"messages": [',                                                          # 2 not JSON
        {"messages": [{"role": "user", "content": "only a question"}]},            # 3 no answer
        {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},   # 4 out of order
        {"conversations": [{"from": "function_call", "value": "f()"}]},            # 5 unknown speaker
        {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},  # 6 unknown role
        {"text": "a pretraining document"},                                        # 7 no format
        {"turns": ["a question", "a follow-up"]},                                  # 8 prompts only
        {"instruction": "q", "output": ""},                                        # 9 empty answer
        "42",                                                                      # 10 not an object
        {"prompt": "q", "response": None},                                         # 11 not a string
    ])
    found, stats = conversations.load_conversations(path)
    assert [c.line for c in found] == [1]
    assert stats.records == 11 and stats.kept == 1 and stats.rejected == 10
    reasons = {line: reason for source, line, reason in stats.examples}
    assert all(source == str(path) for source, _, _ in stats.examples)
    assert sorted(reasons) == list(range(2, 12))
    assert reasons[2].startswith("malformed JSON")
    assert "no assistant turn" in reasons[3]
    assert "message 0 is an assistant turn where a user turn must come" in reasons[4]
    assert "unknown ShareGPT speaker 'function_call'" in reasons[5]
    assert "unknown role 'tool'" in reasons[6]
    assert reasons[7].startswith("unknown format: keys ['text']")
    assert reasons[8].startswith("prompts only")
    assert "message 1 (assistant) is empty" in reasons[9]
    assert reasons[10].startswith("not a JSON object or list")
    assert "content is not a string" in reasons[11]
    assert stats.by_reason["invalid conversation"] == 5


def test_json_list_files_and_a_broken_list(tmp_path):
    good = tmp_path / "list.json"
    good.write_text(json.dumps([{"messages": HI}, {"conversations": []}]))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"messages": ')
    found, stats = conversations.load_conversations([good, broken])
    assert len(found) == 1 and stats.files == 2 and stats.rejected == 2
    assert stats.examples[0][:2] == (str(good), 2)
    assert stats.examples[1][:2] == (str(broken), 0) and "malformed JSON list" in stats.examples[1][2]
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not JSON / JSON-lines files"):
        conversations.load_conversations(tmp_path / "notes.txt")


# Every SFT file in ../shared/data/posttrain/sft, with the exact counts of what it gives and what it rejects.
SHARED_SFT = {
    "fastchat_dummy_conversation.json": (500, 500, {}),
    "nanochat_identity_conversations.jsonl": (1000, 1000, {}),
    "self_instruct_seed_tasks.jsonl": (175, 175, {}),
    "self_instruct_user_oriented_instructions.jsonl": (252, 252, {}),
    "mt_bench_question.jsonl": (80, 0, {"prompts only": 80}),   # questions without answers: not SFT data
}


@pytest.mark.parametrize("name", sorted(SHARED_SFT))
def test_every_shared_sft_file_parses(name):
    records, kept, rejected = SHARED_SFT[name]
    found, stats = conversations.load_conversations(shared_path(f"posttrain/sft/{name}"))
    assert (stats.records, stats.kept, dict(stats.by_reason)) == (records, kept, rejected)
    tok = bpe_tokenizer()
    for conversation in found:   # every kept conversation renders, with something to learn
        ids, mask = chat.render_conversation(tok, conversation.messages, where=conversation.where)
        assert sum(mask) > 0 and ids[0] == tok.token_id("<|endoftext|>")


def test_json_records_is_the_one_reader_invalid_utf8_kept_and_damage_reported(tmp_path):
    """conversations (and preferences, tasks) read JSON through lm.data.readers.json_records: invalid UTF-8 and lone
    surrogate escapes become U+FFFD and are counted, a .jsonl of bare lists is JSON lines, not a list file, and a
    truncated gzip ends with an 'unreadable file' rejection at the last line read."""
    from lm.data import readers
    lines = [json.dumps([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}])
             for i in range(3)]
    raw = (lines[0] + "\n").encode() + b'[{"role": "user", "content": "caf\xe9"}, ' \
        b'{"role": "assistant", "content": "ok"}]\n' + (lines[1] + "\n").encode() + \
        b'[{"role": "user", "content": "\\ud800 lone"}, {"role": "assistant", "content": "ok"}]\n'
    (tmp_path / "lists.jsonl").write_bytes(raw)
    found, stats = conversations.load_conversations(tmp_path / "lists.jsonl")
    assert [c.line for c in found] == [1, 2, 3, 4] and stats.rejected == 0 and stats.utf8_replaced == 2
    assert found[1].messages[0]["content"] == "caf\ufffd" and found[3].messages[0]["content"] == "\ufffd lone"
    items = list(readers.json_records(str(tmp_path / "lists.jsonl")))
    assert [(i.line, i.utf8_replaced) for i in items] == [(1, False), (2, True), (3, False), (4, True)]

    data = gzip.compress("".join(json.dumps({"messages": HI}) + "\n" for _ in range(2000)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    found, stats = conversations.load_conversations(tmp_path / "cut.jsonl.gz")
    assert 0 < len(found) < 2000 and stats.rejected == 1
    source, line, reason = stats.examples[0]
    assert source == str(tmp_path / "cut.jsonl.gz") and line == len(found) and reason.startswith("unreadable file")
