"""lm.eval.icl: the tasks say what they claim, the prompts have the few-shot format, the scores match an independent
forward pass, choices are length-fair, an evaluation reports zero- and few-shot accuracies, and the CLI prints the
table."""
import functools

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lm.eval import icl
from lm.model import Transformer
from lm.tokenizer import train as tokenizer_train


@pytest.fixture(scope="module")
def tok():
    from pydoc_data.topics import topics
    return tokenizer_train.train(list(topics.values())[:40], 512)


@pytest.fixture(scope="module")
def model(tok):
    config = ml_collections.ConfigDict(dict(family="llama", vocab_size=tok.n_vocab, n_layers=2, d_model=64, n_heads=4,
                                            n_kv_heads=2, d_ff=128, max_len=128, init_std=0.2))
    return Transformer(config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("task", list(icl.TASKS))
def test_queries_are_correct_and_reproducible(task):
    queries = icl.build_queries(task, 10, 4, seed=0)
    assert queries == icl.build_queries(task, 10, 4, seed=0)
    assert queries != icl.build_queries(task, 10, 4, seed=1)
    assert len({q["word"] for q in queries}) == 10
    expected = {"copy": lambda w: w, "upper": lambda w: w.upper(), "dunder": lambda w: "__" + w + "__"}[task]
    for q in queries:
        assert q["answer"] == expected(q["word"])
        assert all(a == expected(w) and w != q["word"] for w, a in q["examples"]) and len(q["examples"]) == 4
        assert len(set(q["distractors"])) == icl.N_CHOICES - 1 and q["answer"] not in q["distractors"]
        assert not set(q["distractors"]) & {a for _, a in q["examples"]}
        other_tasks = {q["word"], q["word"].upper(), f"__{q['word']}__"} - {q["answer"]}
        assert set(q["distractors"][:2]) == other_tasks and q["word"] not in q["distractors"][2]


def test_words_come_from_python():
    assert {"len", "print", "sorted"} <= set(icl.builtin_names())
    assert {"len", "iter", "getitem", "init"} <= set(icl.special_method_names())


def test_prompt_format():
    query = dict(word="hash", answer="__hash__", examples=[("len", "__len__"), ("iter", "__iter__")], distractors=[])
    assert icl.prompt("dunder", query, 2) == "Write the special method.\nlen -> __len__\niter -> __iter__\nhash ->"
    assert icl.prompt("dunder", query, 0) == "Write the special method.\nhash ->"


@functools.partial(jax.jit, static_argnames="graphdef")
def _log_softmax(state, tokens, *, graphdef):
    return jax.nn.log_softmax(nnx.merge(graphdef, state)(tokens), axis=-1)


def test_option_scores_match_a_forward_pass(model, tok):
    prompts = ["Repeat the word.\nlen -> len\nzip ->", "Repeat the word.\nabs ->"]
    options = [["zip", "map"], ["abs", "hex"]]
    logprobs, n_tokens, greedy = icl.score_options(model, tok, prompts, options, batch=3)
    graphdef, state = nnx.split(model)
    for i, (text, choices) in enumerate(zip(prompts, options)):
        for j, choice in enumerate(choices):
            context, answer = tok.encode(text), tok.encode(f" {choice}\n")
            tokens = np.zeros((1, 32), np.int32)  # right-filled: causal attention ignores what follows
            tokens[0, :len(context) + len(answer)] = context + answer
            lp = np.asarray(_log_softmax(state, tokens, graphdef=graphdef))[0]
            positions = range(len(context) - 1, len(context) + len(answer) - 1)
            expected = sum(lp[t, tokens[0, t + 1]] for t in positions)
            np.testing.assert_allclose(logprobs[i, j], expected, rtol=1e-5, atol=1e-4)
            assert n_tokens[i, j] == len(answer)
            assert greedy[i, j] == all(np.argmax(lp[t]) == tokens[0, t + 1] for t in positions)


def test_evaluate_reports_zero_and_few_shot(model, tok):
    result = icl.evaluate(model, tok, shots=(0, 2), n_queries=6, seed=0)
    assert set(result["tasks"]) == set(icl.TASKS) and result["shots"] == [0, 2] and result["chance"] == 0.25
    for task, by_shots in result["tasks"].items():
        assert set(by_shots) == {"0", "2"}
        for scores in by_shots.values():
            assert 0 <= scores["choice_accuracy"] <= 1 and 0 <= scores["exact_match"] <= 1 and scores["n"] == 6
        assert result["few_shot_gain"][task] == pytest.approx(
            by_shots["2"]["choice_accuracy"] - by_shots["0"]["choice_accuracy"], abs=1e-3)
    assert [e["task"] for e in result["examples"]] == list(icl.TASKS)
    assert all(e["prompt"].count(" -> ") == 2 and isinstance(e["completion"], str) for e in result["examples"])
    table = icl.markdown(result)
    assert "| task | 0-shot | 2-shot |" in table and all(f"| {t} | " in table for t in [*icl.TASKS, "mean"])


def test_choice_is_length_fair_where_a_sum_is_not():
    """" hash" (2 tokens at -1.0 each) against " __hash__" (5 tokens at -0.5 each): the sum prefers the short wrong
    option (-2.0 > -2.5); the mean per token prefers the answer the model rates higher at every token."""
    logprobs = np.array([[-2.5, -2.0, -6.0]])   # answer, short distractor, long unlikely distractor
    n_tokens = np.array([[5, 2, 6]])
    assert np.argmax(logprobs, axis=1)[0] == 1
    assert icl.choose_option(logprobs, n_tokens)[0] == 0


def test_evaluate_scores_choices_by_mean_log_prob(model, tok):
    """evaluate's choice accuracy is the mean-log-prob choice over score_options' numbers (recomputed here)."""
    result = icl.evaluate(model, tok, shots=(1,), n_queries=5, seed=3, tasks=("dunder",))
    queries = icl.build_queries("dunder", 5, 1, seed=3)
    logprobs, n_tokens, _ = icl.score_options(model, tok, [icl.prompt("dunder", q, 1) for q in queries],
                                              [[q["answer"]] + q["distractors"] for q in queries])
    mean = logprobs / n_tokens
    expected = np.mean([row.argmax() == 0 for row in mean])
    assert result["tasks"]["dunder"]["1"]["choice_accuracy"] == pytest.approx(expected, abs=1e-4)
