"""Graders: every GSM8K reference grades as its own answer, and adversarial outputs do not (a grader bug is a
reward hack)."""
import json

import pytest

from lm.eval import graders
from lm.tokenizer import chat
from tests.conftest import shared_path
from tests.test_chat_template import bpe_tokenizer


@pytest.mark.parametrize("split, count", [("train", 7473), ("test", 1319)])
def test_every_gsm8k_reference_is_accepted_as_its_own_answer(split, count):
    lines = shared_path(f"posttrain/gsm8k/{split}.jsonl").read_text().splitlines()
    assert len(lines) == count
    for number, line in enumerate(lines, 1):
        answer = json.loads(line)["answer"]
        written = answer.rsplit("####", 1)[1].strip()
        reference = graders.gsm8k_reference(answer)
        assert reference == written.replace(",", ""), f"{split}:{number}"
        assert graders.is_correct(answer, written), f"{split}:{number}: the full reference solution"
        assert graders.is_correct(written, written), f"{split}:{number}: the bare number"
        assert graders.is_correct(f"The answer is {written}.", reference), f"{split}:{number}"
        assert not graders.is_correct(f"The answer is {int(reference) + 1}.", written), f"{split}:{number}"


@pytest.mark.parametrize("text, value", [
    ("18", "18"), ("$18", "18"), ("18.0", "18"), ("18.00", "18"), ("+18", "18"), ("1,200", "1200"),
    ("$1,234,567.50", "1234567.5"), ("-3", "-3"), ("\u22123", "-3"), ("-0", "0"), ("50%", "50"), ("0.25", "0.25"),
    ("007", "7"), ("1.2.3", None), ("12th", None), ("1e5", None), ("", None), ("twelve", None), ("12,34", None),
])
def test_normalize_number(text, value):
    assert graders.normalize_number(text) == value


@pytest.mark.parametrize("answer", [
    "", "   ", "I don't know.", "123", "1.25", "2012", "112", "12.5", "120", "12,000", "x12", "12th", "-12", "1/12",
    "12a", "v12.1", "0.12",
])
def test_a_number_containing_the_reference_is_not_the_reference(answer):
    assert not graders.is_correct(answer, "12")


@pytest.mark.parametrize("answer", [
    "12", "12.", "$12", "12.0", "The answer is 12", "So she has 12 apples.", "**12**", "(12)", "3 * 4 = 12",
    "answer: 12", "#### 12", "First 5, then 7, so 12", "12%", "The answer is: $12.00.",
])
def test_the_reference_in_usual_forms_counts(answer):
    assert graders.is_correct(answer, "12")


def test_several_candidates():
    # without a marker the last number is the answer; a hedge after a marker has no answer
    assert graders.extract_answer("It is 12 or maybe 13") == "13"
    assert not graders.is_correct("It is 12 or maybe 13", "12")
    assert graders.extract_answer("Answer: 12 or 13") is None
    assert graders.extract_answer("answer is 12, 13, 14") is None
    assert graders.extract_answer("Answer: 12 (that is, 12)") == "12"                 # one value, said twice
    assert graders.extract_answer("answer: 5\nThe final answer is 12") == "12"       # the last marker counts
    assert graders.extract_answer("The answer is unclear") is None                   # a marker with no number
    assert graders.sole_number("9.9 is larger than 9.11") is None
    assert graders.sole_number("9.9") == graders.sole_number("It is 9.90.") == "9.9"


def test_signs_and_subtraction():
    assert graders.numbers("3-5 and 3 - 5 and 3 -5") == ["3", "5", "3", "5", "3", "5"]
    assert graders.numbers("x = -5, (-2) and -$4") == ["-5", "-2", "-4"]
    assert graders.is_correct("The change is -5", "-5") and not graders.is_correct("10-5", "-5")


def test_an_answer_only_inside_the_thinking_does_not_count():
    tok = bpe_tokenizer()
    ids = chat.render_answer(tok, "I am not sure.", thinking="so the answer is 12")
    thinking, answer, ended = chat.parse_completion(tok, ids)
    assert graders.is_correct(thinking, "12") and not graders.is_correct(answer, "12")
    # unfinished thinking: the whole completion is thinking and the answer is empty
    _, answer, _ = chat.parse_completion(tok, ids[:5])
    assert answer == "" and not graders.is_correct(answer, "12")


def test_references_must_be_numbers():
    with pytest.raises(ValueError, match="not a number"):
        graders.is_correct("12", "twelve")
    with pytest.raises(ValueError, match="no '####'"):
        graders.gsm8k_reference("no final line")
