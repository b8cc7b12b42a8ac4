"""Tasks with checkable answers (nanochat's Task shape): prompts as message lists with reference answers, a reward,
SFT conversations that show the work, and `evaluate` (sampled completions -> pass@k, mean reward, format).

    task = Arithmetic(n_operands=2, digits=2)              # the difficulty dials are constructor arguments
    train = task.examples("train", n=1000, seed=0)        # Example(prompt, reference, answer, thinking, key)
    sft_conversations = [e.conversation for e in train]   # the thinking shows the steps, then the answer
    task.reward(answer_text, example.reference)           # 1.0 or 0.0, on the ANSWER part only
    evaluate(model, tokenizer, task, n=64, samples=8, ks=(1, 8))

Tasks: Arithmetic (worked steps), CountLetters, Identity, CompareDecimals ("9.11 vs 9.9"), GSM8K (from files).
A synthetic task puts a problem in the held-out "test" split when a hash of its key (the problem itself, e.g. the
expression) falls below `held_out_fraction`, so the splits never share a problem whatever the seeds; within a
split the seed picks which problems and in what order (a small problem space repeats problems within its split).

The constructors' defaults are 2-operand 2-digit + and -, words of 3-6 letters, decimals below 20 with at most 2
places; configs/sft_tiny.py sets what the tiny CPU model learns (2-digit + 1-digit worked in columns).
"""
import dataclasses
import hashlib
import math
import pathlib
import random
import re
from typing import Sequence

from lm.data.conversations import ReadStats, read_json_records
from lm.eval import graders
from lm.tokenizer import chat
from lm.tokenizer.base import Tokenizer

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: list               # messages, ending with the user turn
    reference: str             # the checkable answer
    answer: str                # what an SFT assistant answers ...
    thinking: str | None       # ... after showing this work (None: no think block)
    key: str                   # the problem's identity: the two splits never share one

    @property
    def conversation(self) -> list:
        """The SFT conversation: the prompt and the worked assistant answer."""
        reply = {"role": "assistant", "content": self.answer}
        if self.thinking is not None:
            reply["thinking"] = self.thinking
        return [*self.prompt, reply]


class Task:
    """A source of prompts with reference answers and a reward on the assistant's answer text."""
    name = "task"

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        raise NotImplementedError

    def reward(self, answer_text: str, reference: str) -> float:
        """1.0 when the final number of the answer equals the reference (lm.eval.graders), else 0.0."""
        return float(graders.is_correct(answer_text, reference))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")


def _user(text: str) -> list:
    return [{"role": "user", "content": text}]


class SyntheticTask(Task):
    """Problems drawn by `make(rng)`; the split of each problem is fixed by a hash of its key."""
    held_out_fraction = 0.2

    def make(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def split_of(self, key: str) -> str:
        digest = hashlib.blake2b(f"{self.name}\0{key}".encode(), digest_size=8).digest()
        return "test" if int.from_bytes(digest, "big") / 2 ** 64 < self.held_out_fraction else "train"

    def examples(self, split: str, n: int | None = 100, seed: int = 0) -> list[Example]:
        _check_split(split)
        if n is None:
            raise ValueError(f"{self.name} is generated: pass how many examples (n)")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        out, attempts = [], 0
        while len(out) < n:
            attempts += 1
            if attempts > 100 * n + 1000:
                raise ValueError(f"{self.name}: found only {len(out)} {split} problems in {attempts} draws; "
                                 f"the problem space is too small for n={n}")
            example = self.make(rng)
            if self.split_of(example.key) == split:
                out.append(example)
        return out


# -- arithmetic with worked steps ------------------------------------------------------------------------------------
class Arithmetic(SyntheticTask):
    """"What is 23 + 45 - 12?" The thinking evaluates one operation per line, * before + and -, left to right.

    `larger_first` writes each + and * step with the larger operand first ("What is 3 + 8?" -> "8 + 3 = 11"), so the
    step for a held-out problem "3 + 8" is the same fact as the train problem "8 + 3": the model can answer unseen
    problems by a rule it learns on all of them (reorder, then recall) instead of having to have seen the pair.

    `digits` is one width for every operand or one per operand ((2, 1): "47 + 8"). `columns` (2 operands, "+") works
    the sum digit by digit from the ones column ("47 + 38" -> "7 + 8 = 15", "4 + 3 + 1 = 8"): every step is one of
    the 1-digit facts (+ a carry) that every split shares, so a large problem space is solved by one rule."""
    name = "arithmetic"

    def __init__(self, n_operands: int = 2, digits: int | Sequence[int] = 2, ops: str = "+-",
                 allow_negative: bool = False, larger_first: bool = False, columns: bool = False):
        widths = [digits] * n_operands if isinstance(digits, int) else [int(d) for d in digits]
        if (n_operands < 2 or len(widths) != n_operands or min(widths) < 1 or not ops or set(ops) - set("+-*")
                or columns and (n_operands != 2 or ops != "+")):
            raise ValueError(f"Arithmetic(n_operands={n_operands}, digits={digits}, ops={ops!r}, columns={columns}):"
                             f" need >= 2 operands, >= 1 digit each (one width or one per operand), ops from '+-*';"
                             f" columns only for 2 operands and '+'")
        self.n_operands, self.digits, self.ops, self.allow_negative = n_operands, digits, ops, allow_negative
        self.widths, self.larger_first, self.columns = widths, larger_first, columns

    def make(self, rng: random.Random) -> Example:
        while True:
            values = [rng.randrange(10 ** width) for width in self.widths]
            ops = [rng.choice(self.ops) for _ in range(self.n_operands - 1)]
            if self.columns:
                steps, result, lowest = column_steps(*values), sum(values), 0
            else:
                steps, result, lowest = worked_steps(values, ops, self.larger_first)
            if self.allow_negative or lowest >= 0:
                break
        expression = " ".join([str(values[0])] + [f"{op} {v}" for op, v in zip(ops, values[1:])])
        return Example(_user(f"What is {expression}?"), str(result), str(result), "\n".join(steps), expression)


def worked_steps(values: Sequence[int], ops: Sequence[str], larger_first: bool = False) -> tuple[list[str], int, int]:
    """(one line per operation, the result, the lowest intermediate value): * first, then + and - left to right;
    with larger_first, a commutative step (+, *) is written with its larger operand first."""
    values, ops, steps = list(values), list(ops), []
    lowest = min(values)
    for wanted in ("*", "+-"):
        i = 0
        while i < len(ops):
            if ops[i] in wanted:
                a, op, b = values[i], ops[i], values[i + 1]
                value = a * b if op == "*" else a + b if op == "+" else a - b
                shown = (max(a, b), min(a, b)) if larger_first and op in "+*" else (a, b)
                steps.append(f"{shown[0]} {op} {shown[1]} = {value}")
                values[i:i + 2], lowest = [value], min(lowest, value)
                del ops[i]
            else:
                i += 1
    return steps, values[0], lowest


def column_steps(a: int, b: int) -> list[str]:
    """Column addition of a + b, one line per column from the ones: "digit + digit [+ carry] = sum" (a missing
    digit is 0), so the answer is the last line's sum followed by the earlier lines' last digits, last to first."""
    steps, carry = [], 0
    for column in range(len(str(max(a, b)))):
        x, y = a // 10 ** column % 10, b // 10 ** column % 10
        total = x + y + carry
        steps.append(f"{x} + {y}{' + 1' if carry else ''} = {total}")
        carry = total // 10
    return steps


# -- counting letters ------------------------------------------------------------------------------------------------
class CountLetters(SyntheticTask):
    """"How many times does the letter "r" appear in "strawberry"?" on random lowercase words (or a given list)."""
    name = "count_letters"

    def __init__(self, min_len: int = 3, max_len: int = 6, words: Sequence[str] | None = None):
        if not 1 <= min_len <= max_len:
            raise ValueError(f"CountLetters(min_len={min_len}, max_len={max_len}): need 1 <= min_len <= max_len")
        self.min_len, self.max_len, self.words = min_len, max_len, list(words) if words else None

    def make(self, rng: random.Random) -> Example:
        if self.words:
            word = rng.choice(self.words)
        else:
            word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz")
                           for _ in range(rng.randint(self.min_len, self.max_len)))
        # half the time a letter of the word (so counts above zero are common), else any letter
        letter = rng.choice(word) if rng.random() < 0.5 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        positions = [i + 1 for i, c in enumerate(word) if c == letter]
        thinking = (f"Spelled out: {'-'.join(word)}.\n"
                    f"Positions of {letter}: {', '.join(map(str, positions)) or 'none'}.\n"
                    f"Count: {len(positions)}.")
        prompt = _user(f'How many times does the letter "{letter}" appear in "{word}"?')
        return Example(prompt, str(len(positions)), str(len(positions)), thinking, f"{word}|{letter}")


# -- identity --------------------------------------------------------------------------------------------------------
class Identity(SyntheticTask):
    """Short answers about the assistant itself: its name and who made it. The reward: the answer names it."""
    name = "identity"
    NAME_QUESTIONS = ("What is your name?", "What's your name?", "Who are you?", "What should I call you?",
                      "Do you have a name?", "Tell me your name.", "What are you called?")
    MAKER_QUESTIONS = ("Who made you?", "Who created you?", "Who built you?", "Who trained you?",
                       "Which team made you?", "Where do you come from?")
    PREFIXES = ("", "Hi! ", "Hello. ", "Hey, ", "Quick question: ", "Excuse me, ")

    def __init__(self, assistant_name: str = "Lumen", maker: str = "the lm project"):
        self.assistant_name, self.maker = assistant_name, maker

    def make(self, rng: random.Random) -> Example:
        about_name = rng.random() < 0.5
        question = rng.choice(self.NAME_QUESTIONS if about_name else self.MAKER_QUESTIONS)
        prefix = rng.choice(self.PREFIXES)
        text = prefix + (question[0].lower() + question[1:] if prefix else question)
        if rng.random() < 0.3:
            text = text.lower()
        if about_name:
            reference, answer = self.assistant_name, f"I'm {self.assistant_name}, a small assistant."
        else:
            reference, answer = self.maker, f"I was made by {self.maker}."
        return Example(_user(text), reference, answer, None, text)

    def reward(self, answer_text: str, reference: str) -> float:
        """1.0 when the answer names the reference (whole words, any case)."""
        pattern = r"(?<!\w)" + re.escape(reference) + r"(?!\w)"
        return float(re.search(pattern, answer_text or "", re.IGNORECASE) is not None)


# -- comparing decimals ----------------------------------------------------------------------------------------------
class CompareDecimals(SyntheticTask):
    """"Which is larger: 9.11 or 9.9?" Mostly the same whole part and different numbers of decimal places (the
    case that fools models which compare the digits after the point as whole numbers)."""
    name = "compare_decimals"

    def __init__(self, max_whole: int = 20, max_places: int = 2):
        if max_whole < 1 or max_places < 1:
            raise ValueError(f"CompareDecimals(max_whole={max_whole}, max_places={max_places}): need >= 1 each")
        self.max_whole, self.max_places = max_whole, max_places

    def _decimal(self, rng, whole: int) -> str:
        places = rng.randint(1, self.max_places)
        return f"{whole}.{rng.randrange(1, 10 ** places):0{places}d}".rstrip("0")

    def make(self, rng: random.Random) -> Example:
        while True:
            whole = rng.randrange(self.max_whole)
            other = whole if rng.random() < 0.7 else rng.randrange(self.max_whole)
            a, b = self._decimal(rng, whole), self._decimal(rng, other)
            if float(a) != float(b):
                break
        larger = max(a, b, key=float)
        places = max(len(a.split(".")[1]), len(b.split(".")[1]))
        pa, pb = (x.ljust(len(x.split(".")[0]) + 1 + places, "0") for x in (a, b))
        thinking = (f"Write both with {places} decimal places: {pa} and {pb}.\n"
                    f"Compare whole parts, then decimal places left to right.\n{larger} is larger.")
        key = "|".join(sorted((a, b)))
        return Example(_user(f"Which is larger: {a} or {b}?"), larger, larger, thinking, key)

    def reward(self, answer_text: str, reference: str) -> float:
        """1.0 when the only number the answer names is the larger one ("9.9 is larger than 9.11" names both)."""
        return float(graders.sole_number(answer_text) == graders.normalize_number(reference))


# -- GSM8K -----------------------------------------------------------------------------------------------------------
class GSM8K(Task):
    """Grade-school math from {train,test}.jsonl ({"question", "answer"}; the reference after '####'). The SFT
    thinking is the reference reasoning without its <<calculator>> annotations; the answer is the number."""
    name = "gsm8k"
    CALCULATION = re.compile(r"<<[^>]*>>")

    def __init__(self, directory):
        self.directory = pathlib.Path(directory)
        self.stats: dict[str, ReadStats] = {}
        self._cache: dict[str, list[Example]] = {}

    def load(self, split: str) -> list[Example]:
        """Every problem of the split's file, in file order; bad lines are counted in self.stats[split]."""
        _check_split(split)
        if split not in self._cache:
            stats = self.stats[split] = ReadStats()
            path = self.directory / f"{split}.jsonl"
            examples = []
            for line, record in read_json_records(path, stats):
                try:
                    examples.append(self._example(record))
                except ValueError as error:
                    stats.reject(path, line, str(error))
            stats.kept = len(examples)
            self._cache[split] = examples
        return self._cache[split]

    def _example(self, record) -> Example:
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("question", "answer")):
            raise ValueError("not a GSM8K record: expected string 'question' and 'answer'")
        reasoning, _ = record["answer"].rsplit("####", 1) if "####" in record["answer"] else ("", "")
        reference = graders.gsm8k_reference(record["answer"])
        thinking = self.CALCULATION.sub("", reasoning).strip()
        return Example(_user(record["question"].strip()), reference, reference, thinking, record["question"])

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        """All problems in file order (n None), or n of them drawn without replacement by the seed."""
        examples = self.load(split)
        if n is None:
            return list(examples)
        if n > len(examples):
            raise ValueError(f"gsm8k {split}: n={n} > {len(examples)} problems")
        return random.Random(f"{self.name}:{split}:{seed}").sample(examples, n)


# -- rewards and metrics ---------------------------------------------------------------------------------------------
def format_reward(tokenizer: Tokenizer, ids: Sequence[int]) -> float:
    """1.0 for "<|think_start|> thinking <|think_end|> answer <|assistant_end|>" with non-empty thinking and answer
    and no other special token anywhere; else 0.0. (ids: what followed <|assistant_start|>.)"""
    ids = [int(i) for i in ids]
    special = tokenizer.token_id
    end = special(chat.ASSISTANT_END)
    if end not in ids:
        return 0.0
    ids = ids[:ids.index(end)]
    if not ids or ids[0] != special(chat.THINK_START) or special(chat.THINK_END) not in ids:
        return 0.0
    split = ids.index(special(chat.THINK_END))
    thinking, answer = ids[1:split], ids[split + 1:]
    specials = set(tokenizer.special_tokens.values())
    if specials & set(thinking + answer):
        return 0.0
    return float(bool(tokenizer.decode(thinking).strip()) and bool(tokenizer.decode(answer).strip()))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}): need 0 <= c <= n and 1 <= k <= n")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) as a product, which neither overflows nor loses precision
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score(task: Task, tokenizer: Tokenizer, examples: Sequence[Example], completions: Sequence[Sequence],
          ks: Sequence[int] = (1,), n_shown: int = 4) -> dict:
    """Metrics of generated completions: completions[i] holds the sampled id lists for examples[i] (what followed
    <|assistant_start|>). Correct means reward 1.0. Returns pass@k for each k, mean reward, mean format reward,
    how many completions ended, and the first n_shown examples with their first completion."""
    if len(completions) != len(examples):
        raise ValueError(f"{len(completions)} completion lists for {len(examples)} examples")
    samples = {len(c) for c in completions}
    if len(samples) != 1:
        raise ValueError(f"every example needs the same number of completions, got {sorted(samples)}")
    samples = samples.pop()
    rewards, formats, ended, pass_k, shown = [], [], [], {k: [] for k in ks}, []
    for example, outs in zip(examples, completions):
        parsed = [chat.parse_completion(tokenizer, ids) for ids in outs]
        example_rewards = [task.reward(p.answer, example.reference) for p in parsed]
        rewards += example_rewards
        formats += [format_reward(tokenizer, ids) for ids in outs]
        ended += [p.ended for p in parsed]
        correct = sum(r == 1.0 for r in example_rewards)
        for k in ks:
            pass_k[k].append(pass_at_k(samples, correct, k))
        if len(shown) < n_shown:
            shown.append(dict(prompt=example.prompt[-1]["content"], reference=example.reference,
                              thinking=parsed[0].thinking, answer=parsed[0].answer, reward=example_rewards[0]))
    mean = lambda values: sum(values) / len(values) if values else 0.0
    return {"task": task.name, "examples": len(examples), "samples": samples,
            **{f"pass@{k}": mean(v) for k, v in pass_k.items()},
            "reward": mean(rewards), "format": mean(formats), "ended": mean(ended), "shown": shown}


def evaluate(model, tokenizer: Tokenizer, task: Task, split: str = "test", n: int | None = 64, samples: int = 1,
             ks: Sequence[int] = (1,), sampling=None, max_new_tokens: int = 64, seed: int = 0,
             batch_size: int = 64) -> dict:
    """Sample `samples` completions of each of n examples of the split and score them (see `score`).
    The default sampling is greedy for one sample and temperature 1 for several."""
    import jax
    from lm import sample

    examples = task.examples(split, n, seed=seed)
    if sampling is None:
        sampling = sample.Sampling(temperature=0.0 if samples == 1 else 1.0)
    prompts = [chat.render_for_completion(tokenizer, e.prompt) for e in examples for _ in range(samples)]
    key = jax.random.key(seed)
    outs = []
    for start in range(0, len(prompts), batch_size):
        batch = sample.generate_ids(model, prompts[start:start + batch_size], jax.random.fold_in(key, start),
                                    max_new_tokens, sampling, stop_ids=[tokenizer.token_id(chat.ASSISTANT_END)],
                                    vocab_size=tokenizer.n_vocab)
        outs += [batch.tokens[row, :batch.lengths[row]].tolist() for row in range(len(batch.lengths))]
    completions = [outs[i * samples:(i + 1) * samples] for i in range(len(examples))]
    return {"split": split, **score(task, tokenizer, examples, completions, ks)}
