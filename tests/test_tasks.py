"""Tasks with checkable answers: disjoint reproducible splits, rewards that accept the worked answers and reject
wrong ones, the format reward, pass@k against brute force, scoring, and evaluate on a tiny model."""
import itertools
import math

import pytest

from lm.eval import tasks
from lm.tokenizer import chat
from tests.conftest import shared_path
from tests.test_chat_template import bpe_tokenizer

SYNTHETIC = [tasks.Arithmetic(), tasks.Arithmetic(n_operands=4, digits=3, ops="+-*", allow_negative=True),
             tasks.Arithmetic(digits=(2, 1), ops="+", columns=True),
             tasks.CountLetters(), tasks.Identity(), tasks.CompareDecimals(), tasks.CompareDecimals(99, 3)]


@pytest.fixture(scope="module")
def gsm8k():
    return tasks.GSM8K(shared_path("posttrain/gsm8k"))


@pytest.mark.parametrize("task", SYNTHETIC, ids=lambda t: t.name)
def test_splits_never_share_a_problem_and_seeds_reproduce(task):
    train = task.examples("train", 400, seed=0)
    test = task.examples("test", 100, seed=0)
    assert not {e.key for e in train} & {e.key for e in test}
    assert not {e.key for e in task.examples("train", 400, seed=1)} & {e.key for e in test}
    assert task.examples("train", 50, seed=3) == task.examples("train", 50, seed=3)
    assert task.examples("train", 50, seed=3) != task.examples("train", 50, seed=4)
    with pytest.raises(ValueError, match="split="):
        task.examples("validation", 1)


@pytest.mark.parametrize("task", SYNTHETIC, ids=lambda t: t.name)
def test_the_worked_answer_earns_the_reward_and_renders(task):
    tok = bpe_tokenizer()
    for example in task.examples("train", 100, seed=0):
        assert task.reward(example.answer, example.reference) == 1.0, example
        ids, mask = chat.render_conversation(tok, example.conversation)
        assert ids[:mask.index(1)] == chat.render_for_completion(tok, example.prompt)
        if example.thinking is not None:   # the reward reads the answer only, never the thinking
            assert task.reward("", example.reference) == 0.0


def test_arithmetic_steps_and_answer():
    steps, result, lowest = tasks.worked_steps([2, 3, 4, 5], ["+", "*", "-"])
    assert steps == ["3 * 4 = 12", "2 + 12 = 14", "14 - 5 = 9"] and result == 9 and lowest == 2
    for example in tasks.Arithmetic(n_operands=3, digits=2, ops="+-*").examples("train", 200, seed=0):
        expression = example.prompt[0]["content"].removeprefix("What is ").removesuffix("?")
        assert int(example.reference) == eval(expression) >= 0      # Python's own precedence as the reference
        assert example.thinking.splitlines()[-1].endswith(f"= {example.reference}")
    assert tasks.worked_steps([2, 3, 4, 5], ["+", "*", "-"], larger_first=True)[0] == \
        ["4 * 3 = 12", "12 + 2 = 14", "14 - 5 = 9"]          # - keeps its order: it does not commute
    for example in tasks.Arithmetic(n_operands=2, digits=1, ops="+", larger_first=True).examples("test", 50):
        a, b = map(int, example.key.split(" + "))
        assert example.thinking == f"{max(a, b)} + {min(a, b)} = {a + b}" and example.reference == str(a + b)
    assert tasks.Arithmetic().reward("It is 100", "101") == 0.0
    with pytest.raises(ValueError, match="ops from"):
        tasks.Arithmetic(ops="/")


def test_column_addition_steps_rebuild_the_sum():
    assert tasks.column_steps(47, 38) == ["7 + 8 = 15", "4 + 3 + 1 = 8"]
    assert tasks.column_steps(95, 7) == ["5 + 7 = 12", "9 + 0 + 1 = 10"]     # the last carry leads the answer
    task = tasks.Arithmetic(digits=(2, 1), ops="+", columns=True)
    examples = task.examples("train", 300, seed=0)
    for example in examples:
        a, b = map(int, example.key.split(" + "))
        assert b < 10 and example.reference == str(a + b)
        lines = [line.split(" = ")[1] for line in example.thinking.splitlines()]
        assert lines[-1] + "".join(s[-1] for s in reversed(lines[:-1])) == example.reference
    # hundreds of distinct problems in each split (the 1-digit task had ~22 held out)
    assert len({e.key for e in task.examples("test", 1000, seed=0)}) > 150
    with pytest.raises(ValueError, match="columns only"):
        tasks.Arithmetic(ops="+-", columns=True)
    with pytest.raises(ValueError, match="one per operand"):
        tasks.Arithmetic(digits=(2, 1, 1))


def test_difficulty_dials_change_the_problems():
    easy = tasks.Arithmetic(n_operands=2, digits=1).examples("train", 50)
    hard = tasks.Arithmetic(n_operands=5, digits=3).examples("train", 50)
    assert all(len(e.thinking.splitlines()) == 1 and max(map(len, e.key.split()[::2])) == 1 for e in easy)
    assert all(len(e.thinking.splitlines()) == 4 for e in hard)
    words = [e.prompt[0]["content"].split('"')[3] for e in tasks.CountLetters(8, 10).examples("train", 50)]
    assert all(8 <= len(w) <= 10 for w in words)


def test_count_letters_is_right():
    for example in tasks.CountLetters().examples("test", 200):
        _, letter, _, word, _ = example.prompt[0]["content"].split('"')
        assert example.reference == str(word.count(letter))
    assert tasks.CountLetters(words=["strawberry"]).make(__import__("random").Random(0)).key.startswith("strawberry")


def test_compare_decimals_reward_wants_only_the_larger_number():
    task = tasks.CompareDecimals()
    for example in task.examples("train", 200):
        a, b = example.prompt[0]["content"].removeprefix("Which is larger: ").removesuffix("?").split(" or ")
        assert float(example.reference) == max(float(a), float(b)) != min(float(a), float(b))
    assert task.reward("9.9", "9.9") == task.reward("The larger is 9.90.", "9.9") == 1.0
    assert task.reward("9.11", "9.9") == task.reward("9.9 is larger than 9.11", "9.9") == 0.0
    assert task.reward("9.9 or 9.11", "9.9") == task.reward("", "9.9") == 0.0


def test_identity_reward_needs_the_name_as_a_word():
    task = tasks.Identity(assistant_name="Lumen")
    assert task.reward("I'm lumen!", "Lumen") == 1.0
    assert task.reward("I'm Lumenix.", "Lumen") == task.reward("I'm nobody.", "Lumen") == 0.0


def test_gsm8k_splits_references_and_thinking(gsm8k):
    train, test = gsm8k.examples("train"), gsm8k.examples("test")
    assert (len(train), len(test)) == (7473, 1319)
    assert gsm8k.stats["train"].rejected == gsm8k.stats["test"].rejected == 0
    assert not {e.key for e in train} & {e.key for e in test}
    first = test[0]
    assert first.reference == "18" and first.prompt[0]["content"].startswith("Janet")
    assert "<<" not in first.thinking and first.thinking.endswith("$18 every day at the farmer’s market.")
    assert all(gsm8k.reward(e.answer, e.reference) == 1.0 for e in test)
    assert gsm8k.examples("test", 5, seed=1) == gsm8k.examples("test", 5, seed=1) != gsm8k.examples("test", 5)
    with pytest.raises(ValueError, match="n=2000 > 1319"):
        gsm8k.examples("test", 2000)


def test_gsm8k_bad_lines_are_counted(tmp_path):
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "a\\n#### 4"}\n{"question": "q"}\n'
                                         '{"question": "q", "answer": "no final line"}\nnot json\n')
    task = tasks.GSM8K(tmp_path)
    assert [e.reference for e in task.examples("test")] == ["4"]
    stats = task.stats["test"]
    assert stats.rejected == 3 and [line for _, line, _ in stats.examples] == [2, 3, 4]


def test_format_reward():
    tok = bpe_tokenizer()
    good = chat.render_answer(tok, "12", thinking="3 * 4 = 12")
    assert tasks.format_reward(tok, good) == 1.0
    assert tasks.format_reward(tok, good + tok.encode("anything after the end")) == 1.0
    assert tasks.format_reward(tok, chat.render_answer(tok, "12")) == 0.0                       # no thinking
    assert tasks.format_reward(tok, good[:-1]) == 0.0                                           # never ended
    assert tasks.format_reward(tok, chat.render_answer(tok, "", thinking="3 * 4 = 12")) == 0.0  # no answer
    assert tasks.format_reward(tok, chat.render_answer(tok, "12", thinking=" ")) == 0.0         # empty thinking
    think_start = tok.token_id("<|think_start|>")
    assert tasks.format_reward(tok, good[:2] + [think_start] + good[2:]) == 0.0                 # stray special
    assert tasks.format_reward(tok, [tok.token_id("<|user_start|>")] + good) == 0.0


def brute_force_pass_at_k(n, c, k):
    """The fraction of all k-subsets of n samples (c correct) that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


def test_pass_at_k_equals_brute_force():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert math.isclose(tasks.pass_at_k(n, c, k), brute_force_pass_at_k(n, c, k), abs_tol=1e-12)
    assert tasks.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert 0 < tasks.pass_at_k(1000, 1, 10) < 1          # large n: no overflow
    with pytest.raises(ValueError):
        tasks.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        tasks.pass_at_k(4, 1, 5)


def test_score_perfect_wrong_and_mixed_completions():
    tok, task = bpe_tokenizer(), tasks.Arithmetic()
    examples = task.examples("test", 6)
    right = [chat.render_answer(tok, e.answer, e.thinking) for e in examples]
    wrong = [chat.render_answer(tok, str(int(e.reference) + 1), e.thinking) for e in examples]
    perfect = tasks.score(task, tok, examples, [[r] for r in right], ks=(1,))
    assert (perfect["pass@1"], perfect["reward"], perfect["format"], perfect["ended"]) == (1.0, 1.0, 1.0, 1.0)
    assert tasks.score(task, tok, examples, [[w] for w in wrong])["pass@1"] == 0.0
    # 4 samples each, 1 right: pass@1 = 1/4, pass@4 = 1; the thinking alone never scores
    only_thinking = [chat.render_answer(tok, "no idea", e.thinking) for e in examples]
    mixed = tasks.score(task, tok, examples, [[w, r, t, w] for w, r, t in zip(wrong, right, only_thinking)],
                        ks=(1, 2, 4))
    assert mixed["pass@1"] == pytest.approx(0.25) and mixed["pass@2"] == pytest.approx(0.5)
    assert mixed["pass@4"] == 1.0 and mixed["reward"] == pytest.approx(0.25) and mixed["samples"] == 4
    assert mixed["shown"][0]["reference"] == examples[0].reference
    with pytest.raises(ValueError, match="same number of completions"):
        tasks.score(task, tok, examples[:2], [[right[0]], [right[1], right[1]]])


def test_evaluate_runs_the_sampler_on_a_tiny_model():
    import ml_collections
    from flax import nnx
    from lm.model import Transformer
    tok = bpe_tokenizer()
    config = ml_collections.ConfigDict(dict(
        family="gpt2", vocab_size=tok.n_vocab, n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64,
        max_len=64, dtype="float32", param_dtype="float32", init_std=0.2))
    model = Transformer(config, rngs=nnx.Rngs(0))
    result = tasks.evaluate(model, tok, tasks.Arithmetic(), n=4, samples=2, ks=(1, 2), max_new_tokens=8)
    assert (result["examples"], result["samples"], result["split"]) == (4, 2, "test")
    assert 0 <= result["pass@1"] <= result["pass@2"] <= 1 and 0 <= result["ended"] <= 1
    again = tasks.evaluate(model, tok, tasks.Arithmetic(), n=4, samples=2, ks=(1, 2), max_new_tokens=8)
    assert again["shown"] == result["shown"]        # seeded sampling: the same completions
