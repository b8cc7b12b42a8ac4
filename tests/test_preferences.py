"""Preference pairs: HH-RLHF transcripts and the other formats to (prompt, chosen, rejected), counted rejections,
a deterministic prompt-disjoint split, and both sides rendered into rows."""
import json

import numpy as np
import pytest

from lm.data import preferences
from tests.conftest import shared_path
from tests.test_chat_template import AE, AS, BOS, PAD, UE, US, b, byte_tokenizer
from tests.test_conversations import write_lines

HH_CHOSEN = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken..."
HH_REJECTED = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: No."
PROMPT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
          {"role": "user", "content": "Tell me a joke."}]


def test_hh_transcripts_become_a_shared_prompt_and_two_answers(tmp_path):
    path = write_lines(tmp_path / "hh.jsonl.gz", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    (pair,), stats = preferences.load_pairs(path)
    assert pair.prompt == PROMPT
    assert (pair.chosen, pair.rejected) == ("Why did the chicken...", "No.")
    assert pair.chosen_messages == PROMPT + [{"role": "assistant", "content": "Why did the chicken..."}]
    assert pair.where == f"{path}:1" and dict(stats.by_format) == {"hh_rlhf": 1}


def test_other_formats_give_the_same_pair(tmp_path):
    as_messages = lambda answer: PROMPT + [{"role": "assistant", "content": answer}]
    path = write_lines(tmp_path / "p.jsonl", [
        {"prompt": PROMPT, "chosen": "Why did the chicken...", "rejected": "No."},
        {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "Why did the chicken..."}],
         "rejected": [{"role": "assistant", "content": "No."}]},
        {"chosen": as_messages("Why did the chicken..."), "rejected": as_messages("No.")},
        {"prompt": "Tell me a joke.", "chosen": "Why did the chicken...", "rejected": "No."},
    ])
    pairs, stats = preferences.load_pairs(path)
    assert stats.rejected == 0
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs[:3]] == [(PROMPT, "Why did the chicken...", "No.")] * 3
    assert pairs[3].prompt == [{"role": "user", "content": "Tell me a joke."}]
    assert dict(stats.by_format) == {"prompt_chosen_rejected": 3, "messages": 1}


def test_bad_pairs_are_counted_with_file_line_and_reason(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},                                        # 1 good
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace("a joke", "a story")},           # 2 prompts differ
        {"chosen": HH_CHOSEN, "rejected": HH_CHOSEN},                                          # 3 identical
        {"chosen": "Hello\n\nAssistant: hi", "rejected": "Hello\n\nAssistant: yo"},            # 4 text before Human
        {"chosen": "\n\nHuman: q\n\nAssistant: ", "rejected": "\n\nHuman: q\n\nAssistant: a"},  # 5 empty answer
        {"chosen": "\n\nHuman: q", "rejected": "\n\nHuman: q"},                               # 6 no answer
        {"chosen": "\n\nHuman: q\n\nAssistant: a\n\nAssistant: b",
         "rejected": "\n\nHuman: q\n\nAssistant: a\n\nAssistant: c"},                          # 7 out of order
        {"text": "x"},                                                                         # 8 no format
        "not json",                                                                            # 9
    ])
    pairs, stats = preferences.load_pairs(path)
    assert [p.line for p in pairs] == [1] and stats.rejected == 8
    reasons = {line: reason for _, line, reason in stats.examples}
    assert reasons[2].startswith("prompts differ")
    assert reasons[3].startswith("identical answers")
    assert reasons[4].startswith("text before the first")
    assert "message 1 (assistant) is empty" in reasons[5]
    assert "does not end with an assistant turn" in reasons[6]
    assert "message 2 is an assistant turn where a user turn must come" in reasons[7]
    assert reasons[8].startswith("unknown format")
    assert reasons[9].startswith("malformed JSON")


def test_real_hh_rlhf_harmless_test_set():
    pairs, stats = preferences.load_pairs(shared_path("posttrain/preference/hh_rlhf_harmless_base_test.jsonl.gz"))
    # 2312 lines; 13 are broken in the data itself (checked by hand: e.g. line 668 has two Assistant turns in a
    # row, line 1255 has "Human:" without its blank line inside an answer, so the two prompts differ).
    assert (stats.records, stats.kept, stats.rejected) == (2312, 2299, 13)
    assert dict(stats.by_reason) == {"invalid conversation": 8, "prompts differ": 5}
    assert all(p.prompt[-1]["role"] == "user" and p.chosen != p.rejected for p in pairs)
    train, held_out = preferences.split_pairs(pairs, held_out_fraction=0.1, seed=0)
    assert len(train) + len(held_out) == len(pairs) and 0.07 < len(held_out) / len(pairs) < 0.13
    as_key = lambda pair: json.dumps(pair.prompt)
    assert not {as_key(p) for p in train} & {as_key(p) for p in held_out}
    again = preferences.split_pairs(list(reversed(pairs)), held_out_fraction=0.1, seed=0)[1]
    assert sorted(p.line for p in again) == sorted(p.line for p in held_out)      # independent of order
    other = preferences.split_pairs(pairs, held_out_fraction=0.1, seed=1)[1]
    assert {p.line for p in other} != {p.line for p in held_out}


def test_pairs_render_into_aligned_rows_and_too_long_pairs_are_dropped():
    pairs = [preferences.PreferencePair([{"role": "user", "content": "q"}], "yes", "no"),
             preferences.PreferencePair([{"role": "user", "content": "q"}], "y" * 40, "n")]
    rows = preferences.tokenize_pairs(byte_tokenizer(), pairs, seq_len=16)
    assert rows["stats"] == {"pairs": 2, "rows": 1, "dropped_too_long": 1}
    chosen = [BOS, US, *b("q"), UE, AS, *b("yes"), AE]
    rejected = [BOS, US, *b("q"), UE, AS, *b("no"), AE]
    assert rows["chosen_ids"][0].tolist() == chosen + [PAD] * (17 - len(chosen))
    assert rows["rejected_ids"][0].tolist() == rejected + [PAD] * (17 - len(rejected))
    assert rows["chosen_lengths"].tolist() == [len(chosen)] and rows["rejected_lengths"].tolist() == [len(rejected)]
    assert rows["chosen_ids"][0, rows["chosen_lengths"][0] - 1] == AE
    targets = rows["chosen_ids"][0, 1:]
    assert targets[rows["chosen_mask"][0] == 1].tolist() == [*b("yes"), AE]
    assert rows["rejected_mask"].dtype == np.float32 and rows["rejected_mask"].shape == (1, 16)


def test_split_fraction_is_checked():
    with pytest.raises(ValueError, match="held_out_fraction"):
        preferences.split_pairs([], held_out_fraction=1.5)
