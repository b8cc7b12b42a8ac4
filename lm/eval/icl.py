"""In-context learning: is the model better at a task when the prompt first shows it a few solved examples?

Each task maps a word to an answer, written in the seed's "teacher → 선생" style, one pair a line:

    Write the special method.        <- the instruction (zero-shot prompts have only it and the query)
    len -> __len__                   <- k solved examples (k-shot)
    iter -> __iter__
    hash ->                          <- the query; the answer is " __hash__"

The words come from Python itself (builtin names, special-method names), so a model trained on CPython's
documentation has seen them; the tasks need copying from the prompt, which small models learn first:
    copy    len -> len          upper   len -> LEN          dunder   len -> __len__
Two scores per task and number of shots, both from one forward pass over prompt + " answer\n":
    choice_accuracy  the answer line has a higher mean log-prob per token than 3 distractors (chance 0.25): the
                     query word as the two other tasks answer it (hash, HASH for dunder), which only the examples
                     rule out, and another word's answer (__len__), which only the query rules out. The mean, not
                     the sum: a summed log-prob favours the shortest option (" hash" over " __hash__"), which put
                     the upper and dunder tasks below chance;
    exact_match      greedy decoding produces exactly the answer and the newline (every token is the argmax).
A few greedy completions from lm.sample.generate are kept as examples.

    python -m lm.eval.icl --workdir=runs/tiny [--shots=0,1,4 --queries=32 --seed=0]

prints the table (the markdown report.md shows) and writes the full result to <workdir>/icl.json.
"""
import builtins
import json
import pathlib

import jax
import numpy as np
from absl import app, flags, logging

from lm import sample

N_CHOICES = 4


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
    """Queries of a task: {word, answer, examples [(word, answer)] (max_shots), distractors [answers]}.

    At most as many queries as the task has words (each word is asked once).
    """
    _, words_fn, answer = TASKS[task]
    words = words_fn()
    rng = np.random.default_rng([seed, list(TASKS).index(task)])
    if len(words) < max_shots + N_CHOICES:
        raise ValueError(f"task {task}: {len(words)} words are too few for {max_shots} shots")
    queries = []
    for word in rng.permutation(words)[:n_queries]:
        others = [w for w in rng.permutation(words) if w != word]
        shown, rest = others[:max_shots], others[max_shots:]
        word = str(word)
        # The word as the other tasks would answer it (only the examples say which task this is), and another
        # word's answer (only the query says which word).
        distractors = [fn(word) for name, (_, _, fn) in TASKS.items() if name != task]
        distractors += [answer(str(w)) for w in rest[:N_CHOICES - len(distractors) - 1]]
        queries.append(dict(word=word, answer=answer(word), examples=[(str(w), answer(str(w))) for w in shown],
                            distractors=distractors))
    return queries


def prompt(task: str, query: dict, shots: int) -> str:
    instruction = TASKS[task][0]
    lines = [instruction] + [f"{w} -> {a}" for w, a in query["examples"][:shots]] + [f"{query['word']} ->"]
    return "\n".join(lines)


def evaluate(model, tokenizer, shots=(0, 1, 4), n_queries: int = 32, seed: int = 0, tasks=tuple(TASKS)) -> dict:
    """Zero- and few-shot scores of every task.

    Returns {"tasks": {task: {shots: {choice_accuracy, exact_match}}}, "mean": {metric: {shots: value}},
    "few_shot_gain": {task: choice accuracy at the most shots minus at the fewest}, "examples": [...], ...}.
    """
    shots = sorted(set(int(k) for k in shots))
    cases = [(task, k, q) for task in tasks for q in build_queries(task, n_queries, max(shots), seed) for k in shots]
    prompts = [prompt(task, q, k) for task, k, q in cases]
    options = [[q["answer"]] + q["distractors"] for _, _, q in cases]
    logprobs, n_tokens, greedy = score_options(model, tokenizer, prompts, options)
    correct = choose_option(logprobs, n_tokens) == 0
    results = {task: {} for task in tasks}
    for task in tasks:
        for k in shots:
            rows = [i for i, (t, n, _) in enumerate(cases) if t == task and n == k]
            results[task][str(k)] = dict(choice_accuracy=round(float(correct[rows].mean()), 4),
                                         exact_match=round(float(greedy[rows, 0].mean()), 4), n=len(rows))
        logging.info("icl %s: %s", task, results[task])
    mean = {metric: {str(k): round(float(np.mean([results[t][str(k)][metric] for t in tasks])), 4) for k in shots}
            for metric in ("choice_accuracy", "exact_match")}
    gain = {t: round(results[t][str(shots[-1])]["choice_accuracy"] - results[t][str(shots[0])]["choice_accuracy"], 4)
            for t in tasks}
    return dict(tasks=results, mean=mean, few_shot_gain=gain, shots=shots, queries=n_queries, chance=1 / N_CHOICES,
                examples=examples(model, tokenizer, tasks, max(shots), seed))


def choose_option(logprobs, n_tokens):
    """The index of the chosen option per row: the highest mean log-prob per token (length-fair; a sum would
    prefer short options). logprobs, n_tokens: [rows, options] summed log-probs and token counts."""
    return np.argmax(np.asarray(logprobs) / np.maximum(np.asarray(n_tokens), 1), axis=1)


def score_options(model, tokenizer, prompts: list[str], options: list[list[str]], batch: int = 64):
    """For each prompt and option " <option>\n": (summed log-prob, its number of tokens, whether greedy decoding
    produces it exactly), each [len(prompts), len(options[0])].

    Rows go through the model in batches of one fixed shape (one compile).
    """
    rows, spans = [], []
    for text, choices in zip(prompts, options):
        context = tokenizer.encode(text)
        for choice in choices:
            continuation = tokenizer.encode(f" {choice}\n")
            rows.append(context + continuation)
            spans.append((len(context), len(context) + len(continuation)))
    longest = max(map(len, rows))
    if longest > model.spec.max_len:
        raise ValueError(f"an ICL prompt of {longest} tokens exceeds config.model.max_len={model.spec.max_len}; "
                         f"use fewer shots")
    width = min(sample.bucket(longest), model.spec.max_len)
    logprobs, greedy = np.zeros(len(rows)), np.zeros(len(rows), bool)
    for first in range(0, len(rows), batch):
        chunk = rows[first:first + batch]
        tokens = np.zeros((batch, width), np.int32)
        lengths = np.ones(batch, np.int32)
        for i, row in enumerate(chunk):
            tokens[i, :len(row)], lengths[i] = row, len(row)
        scores, is_greedy = jax.device_get(sample.score_tokens(model, tokens, lengths))
        for i, (start, end) in enumerate(spans[first:first + batch]):
            # scores[:, t - 1] rates tokens[:, t]
            logprobs[first + i] = scores[i, start - 1:end - 1].sum()
            greedy[first + i] = is_greedy[i, start - 1:end - 1].all()
    n_tokens = np.array([end - start for start, end in spans])
    shape = (len(prompts), -1)
    return logprobs.reshape(shape), n_tokens.reshape(shape), greedy.reshape(shape)


def examples(model, tokenizer, tasks, shots: int, seed: int) -> list[dict]:
    """One query per task with `shots` examples and the model's greedy completion (via lm.sample.generate)."""
    queries = [(task, build_queries(task, 1, shots, seed + 1)[0]) for task in tasks]
    prompts = [prompt(task, q, shots) for task, q in queries]
    longest = max(len(tokenizer.encode(f" {q['answer']}\n")) for _, q in queries)
    completions = sample.generate(model, tokenizer, prompts, jax.random.key(seed), sample.Sampling(temperature=0),
                                  max_new_tokens=longest, stop=["\n"])
    return [dict(task=task, prompt=p, answer=q["answer"], completion=c.text.strip())
            for (task, q), p, c in zip(queries, prompts, completions)]


def markdown(result: dict) -> str:
    """A table of an `evaluate` result for report.md: choice accuracy / exact match per task and number of shots."""
    shots = [str(k) for k in result["shots"]]
    lines = [f"choice accuracy (mean log-prob per token) / exact match, {result['queries']} queries per task "
             f"(choice chance {result['chance']:.2f})", "",
             "| task | " + " | ".join(f"{k}-shot" for k in shots) + " |", "|---" * (len(shots) + 1) + "|"]
    rows = list(result["tasks"].items()) + [("mean", {k: {m: result["mean"][m][k] for m in result["mean"]}
                                                       for k in shots})]
    for task, by_shots in rows:
        cells = [f"{by_shots[k]['choice_accuracy']:.2f} / {by_shots[k]['exact_match']:.2f}" for k in shots]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    for e in result.get("examples", []):
        lines += ["", f"{e['task']}: answer {e['answer']!r}, greedy completion {e['completion']!r}", "```",
                  e["prompt"], "```"]
    return "\n".join(lines)


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
    from lm import checkpoint  # only the program reads checkpoints
    workdir = pathlib.Path(FLAGS.workdir)
    model, tok, _, meta = checkpoint.load_run(workdir, step=FLAGS.step)
    result = evaluate(model, tok, [int(s) for s in FLAGS.shots], FLAGS.queries, FLAGS.seed)
    result["step"] = meta.get("step")
    (workdir / "icl.json").write_text(json.dumps(result, indent=1))
    print(markdown(result))
    logging.info("step %s; the full result is in %s", meta.get("step"), workdir / "icl.json")


if __name__ == "__main__":
    define_flags()
    app.run(main)
