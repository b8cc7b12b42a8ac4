"""Graders: the final answer of a completion, normalised, compared with a reference. A grader bug is a reward hack.

Graders see only the ANSWER part of a completion (lm.tokenizer.chat.parse_completion splits off the thinking), so a
number that appears only inside the thinking never counts.

A number is a run of digits with an optional sign, `$`, thousands commas (exactly groups of three: "1,234"), decimal
part and `%`, standing alone: not glued to letters, digits, a dot or a fraction slash. So "2012" is one number (never
12), "1.25" is one number (never 1 or 25), "12th", "x12" and "1/12" are no number, "3-5" and "3 -5" are 3 and 5 (a
sign right after a number or ")" is an operator), "is -5" is minus five, "1,2,3" is 1, 2 and 3. Normalised, a number is its exact decimal value
written plainly: "$1,200.00" -> "1200", "+7" -> "7", "-0.50" -> "-0.5", "50%" -> "50" (GSM8K references are bare
numbers, so a percent sign is dropped, not divided out). Fractions like 1/2 are not values (two numbers).

The final answer (`extract_answer`):
  * if the answer has a marker — `####`, `answer:` or `answer is` (any case) — the numbers on the rest of the line
    after the LAST marker must have exactly one value, and that is the answer (a hedge like "answer: 12 or 13"
    has none);
  * otherwise the last number of the answer text.
"""
import decimal
import re

NUMBER = re.compile(r"(?<![\w.])(?<!\d/)(?:[-\u2212+](?=\$?\d))?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?"
                    r"(?![\w]|[./]\d)")
SIGN_AFTER_OPERAND = re.compile(r"[\d)%]$")
MARKER = re.compile(r"####|\banswer\s*(?::|is\b)", re.IGNORECASE)


def normalize_number(text: str) -> str | None:
    """The plain decimal value of one number as written ("$1,200.0" -> "1200"); None if it is not one."""
    text = text.strip().replace("\u2212", "-")
    match = NUMBER.fullmatch(text)
    if match is None:
        return None
    sign = "-" if text.startswith("-") else ""
    digits = text.lstrip("+-").lstrip("$").rstrip("%").replace(",", "")
    value = decimal.Decimal(sign + digits)
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def numbers(text: str) -> list[str]:
    """Every number in the text, normalised, in order. A sign right after a number or ")" is an operator."""
    found = []
    for match in NUMBER.finditer(text):
        number = match.group()
        if number[0] in "-\u2212+" and SIGN_AFTER_OPERAND.search(text[:match.start()].rstrip()):
            number = number[1:]   # "3 -5" or "(2) -5": subtraction, not a negative five
        found.append(normalize_number(number))
    return found


def extract_answer(answer_text: str) -> str | None:
    """The final answer of an answer text (see the module docstring), normalised; None when there is none."""
    if not answer_text:
        return None
    markers = list(MARKER.finditer(answer_text))
    if markers:
        after = answer_text[markers[-1].end():].split("\n", 1)[0]
        values = set(numbers(after))
        return values.pop() if len(values) == 1 else None
    found = numbers(answer_text)
    return found[-1] if found else None


def sole_number(answer_text: str) -> str | None:
    """The one value the answer mentions (repeated is fine); None if it names no number or several."""
    values = set(numbers(answer_text or ""))
    return values.pop() if len(values) == 1 else None


def is_correct(answer_text: str, reference: str) -> bool:
    """The answer's final number equals the reference's value (the reference is a number as written)."""
    expected = normalize_number(reference)
    if expected is None:
        raise ValueError(f"reference {reference!r} is not a number")
    return extract_answer(answer_text) == expected


def gsm8k_reference(answer_field: str) -> str:
    """The normalised final answer of a GSM8K answer field: the number after its last '####'."""
    if "####" not in answer_field:
        raise ValueError(f"no '####' in GSM8K answer {answer_field[-80:]!r}")
    value = normalize_number(answer_field.rsplit("####", 1)[1])
    if value is None:
        raise ValueError(f"GSM8K answer after '####' is not a number: {answer_field.rsplit('####', 1)[1]!r}")
    return value
