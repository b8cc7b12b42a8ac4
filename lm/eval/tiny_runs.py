"""The starting point of GRPO's tests and benchmark: a BPE trained on arithmetic problems, a random tiny model saved
as the SFT run, and an easy reward such a model earns about half the time (tests/test_grpo.py, tests/test_report.py,
benchmarks/bench_grpo.py).

    tok = arithmetic_tokenizer(300)
    random_run(workdir / "sft", config, tok)     # config.model sized for tok
    grpo.run(grpo_config, workdir, task=HasDigit())
"""
from flax import nnx

from lm import hf as lm_hf
from lm.eval import tasks
from lm.model import Transformer
from lm.tokenizer import train as tokenizer_train


class HasDigit(tasks.Task):
    """Arithmetic prompts with an easy reward a random model earns about half the time: the answer has a digit."""
    name = "has_digit"

    def examples(self, split, n=None, seed=0):
        return tasks.Arithmetic().examples(split, n, seed)

    def reward(self, answer_text, reference):
        return float(any(c.isdigit() for c in answer_text))


def arithmetic_tokenizer(vocab_size: int, directory=None, extra_texts=(), problems: int = 300):
    """A BPE of vocab_size tokens trained on `problems` arithmetic prompts with their thinking (and extra_texts);
    saved in `directory` when given."""
    texts = [e.prompt[0]["content"] + " " + e.thinking for e in tasks.Arithmetic().examples("train", problems)]
    return tokenizer_train.train([*extra_texts, " ".join(texts)], vocab_size, directory)


def random_run(run, config, tokenizer, seed: int = 0) -> Transformer:
    """A freshly initialised Transformer(config.model), saved as an SFT run in `run` (lm.hf.save_run)."""
    model = Transformer(config.model, rngs=nnx.Rngs(seed))
    lm_hf.save_run(run, model, config, tokenizer)
    return model
