"""In-context learning: is the model better at a task when the prompt first shows it a few solved examples?

Each task maps a word to an answer, written in the seed's "teacher → 선생" style, one pair a line:

    Write the special method.        <- the instruction (zero-shot prompts have only it and the query)
    len -> __len__                   <- k solved examples (k-shot)
    iter -> __iter__
    hash ->                          <- the query; the answer is " __hash__"

The words come from Python itself (builtin names, special-method names), so a model trained on CPython's
documentation has seen them; the tasks need copying from the prompt, which small models learn first:
    copy    len -> len          upper   len -> LEN          dunder   len -> __len__
Two scores per task and number of shots:
    choice_accuracy  the answer is more probable (summed log-prob) than 3 distractors, other words' answers
                     (chance 0.25);
    exact_match      greedy generation up to the end of the line is exactly the answer.

    python -m lm.icl --workdir=runs/tiny [--shots=0,1,4 --queries=32 --seed=0]
"""
import builtins
import json
import pathlib

import jax
import numpy as np
from absl import app, flags, logging

from lm import sample

N_CHOICES = 4
SCORE_BUCKET = 16  # scored sequences are padded to a multiple of this, so few lengths compile


def builtin_names() -> list[str]:
    return sorted(n for n in dir(builtins) if n.isalpha() and n.islower())


def special_method_names() -> list[str]:
    """Names n for which __n__ is an attribute of a builtin type (len, iter, getitem, ...)."""
    types = (object, type, int, float, complex, str, bytes, list, tuple, dict, set, range, slice, property)
    return sorted({a[2:-2] for t in types for a in dir(t) if a.startswith("__") and a.endswith("__")
                   and a[2:-2].isalpha()})


# name -> (instruction, words, word -> answer)
TASKS = {
    "copy": ("Repeat the word.", builtin_names, lambda w: w),
    "upper": ("Write the word in capitals.", builtin_names, str.upper),
    "dunder": ("Write the special method.", special_method_names, lambda w: f"__{w}__"),
}


def build_queries(task: str, n_queries: int, max_shots: int, seed: int) -> list[dict]:
    """Queries of a task: {word, answer, examples [(word, answer)] (max_shots), distractors [answers]}."""
    _, words_fn, answer = TASKS[task]
    words = words_fn()
    rng = np.random.default_rng([seed, list(TASKS).index(task)])
    if len(words) < max_shots + N_CHOICES:
        raise ValueError(f"task {task}: {len(words)} words are too few for {max_shots} shots")
    queries = []
    for word in rng.permutation(words)[:n_queries]:
        others = [w for w in rng.permutation(words) if w != word]
        examples, rest = others[:max_shots], others[max_shots:]
        queries.append(dict(word=str(word), answer=answer(str(word)),
                            examples=[(str(w), answer(str(w))) for w in examples],
                            distractors=[answer(str(w)) for w in rest[:N_CHOICES - 1]]))
    return queries


def prompt(task: str, query: dict, shots: int) -> str:
    instruction = TASKS[task][0]
    lines = [instruction] + [f"{w} -> {a}" for w, a in query["examples"][:shots]] + [f"{query['word']} ->"]
    return "\n".join(lines)


def evaluate(model, tokenizer, shots=(0, 1, 4), n_queries: int = 32, seed: int = 0, tasks=tuple(TASKS)) -> dict:
    """Zero- and few-shot scores of every task: {"tasks": {task: {shots: {choice_accuracy, exact_match}}}, ...}."""
    shots = sorted(set(int(s) for s in shots))
    results = {}
    for task in tasks:
        queries = build_queries(task, n_queries, max(shots), seed)
        results[task] = {str(k): score_task(model, tokenizer, task, queries, k) for k in shots}
        logging.info("icl %s: %s", task, results[task])
    summary = {metric: {str(k): round(float(np.mean([results[t][str(k)][metric] for t in tasks])), 4)
                        for k in shots} for metric in ("choice_accuracy", "exact_match")}
    return dict(tasks=results, mean=summary, shots=shots, queries=n_queries, chance=1 / N_CHOICES,
                few_shot_gain={t: round(results[t][str(shots[-1])]["choice_accuracy"]
                                        - results[t][str(shots[0])]["choice_accuracy"], 4) for t in tasks},
                example_prompt=prompt(tasks[0], build_queries(tasks[0], 1, max(shots), seed)[0], min(2, max(shots))))


def score_task(model, tokenizer, task: str, queries: list[dict], shots: int) -> dict:
    prompts = [prompt(task, q, shots) for q in queries]
    choices = [[q["answer"]] + q["distractors"] for q in queries]
    scores = choice_logprobs(model, tokenizer, prompts, choices)
    answers = [q["answer"] for q in queries]
    generated = greedy_answers(model, tokenizer, prompts, answers)
    return dict(choice_accuracy=round(float(np.mean(np.argmax(scores, axis=1) == 0)), 4),
                exact_match=round(float(np.mean([g == a for g, a in zip(generated, answers)])), 4))


def choice_logprobs(model, tokenizer, prompts: list[str], choices: list[list[str]]) -> np.ndarray:
    """log p(" " + choice | prompt) summed over the choice's tokens: float [len(prompts), len(choices[0])]."""
    rows, spans = [], []
    for text, options in zip(prompts, choices):
        context = tokenizer.encode(text)
        for option in options:
            continuation = tokenizer.encode(" " + option)
            rows.append(context + continuation)
            spans.append((len(context), len(context) + len(continuation)))
    if max(map(len, rows)) > model.spec.max_len:
        raise ValueError(f"an ICL prompt of {max(map(len, rows))} tokens exceeds max_len={model.spec.max_len}; "
                         f"use fewer shots")
    width = -(-max(map(len, rows)) // SCORE_BUCKET) * SCORE_BUCKET
    tokens = np.zeros((len(rows), min(width, model.spec.max_len)), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
    logprobs = np.asarray(sample.sequence_logprobs(model, tokens, [len(r) for r in rows]))
    # logprobs[:, t - 1] scores tokens[:, t]
    totals = [logprobs[i, start - 1:end - 1].sum() for i, (start, end) in enumerate(spans)]
    return np.array(totals).reshape(len(prompts), -1)


def greedy_answers(model, tokenizer, prompts: list[str], answers: list[str]) -> list[str]:
    """The greedy completion of each prompt up to the end of its line, stripped."""
    longest = max(len(tokenizer.encode(" " + a)) for a in answers) + 2
    completions = sample.generate(model, tokenizer, prompts, jax.random.key(0), sample.Sampling(temperature=0),
                                  max_new_tokens=longest, stop=["\n"])
    return [c.text.strip() for c in completions]


FLAGS = flags.FLAGS


def define_flags():
    """Flags exist only when run as a program, so importing this module never clashes with another's flags."""
    flags.DEFINE_string("workdir", None, "Run directory with checkpoints/ and tokenizer/.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_list("shots", ["0", "1", "4"], "Numbers of solved examples in the prompt.")
    flags.DEFINE_integer("queries", 32, "Queries per task.")
    flags.DEFINE_integer("seed", 0, "Seed for choosing queries, examples and distractors.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from lm import checkpoint, tokenizer as lm_tokenizer
    workdir = pathlib.Path(FLAGS.workdir)
    model, _, meta = checkpoint.load_model(workdir, step=FLAGS.step)
    tok = lm_tokenizer.load(workdir / "tokenizer")
    result = evaluate(model, tok, [int(s) for s in FLAGS.shots], FLAGS.queries, FLAGS.seed)
    result["step"] = meta.get("step")
    (workdir / "icl.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    logging.info("written %s", workdir / "icl.json")


if __name__ == "__main__":
    define_flags()
    app.run(main)
