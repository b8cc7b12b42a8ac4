"""The "sample" stage of lm.main: a few samples at two temperatures and the in-context-learning table.

    result = run(config, workdir)        # writes <workdir>/samples.json and <workdir>/icl.json
    lines = markdown(result)             # its section of report.md
"""
import json
import pathlib

import jax

from lm import checkpoint, sample
from lm.eval import icl

REPORT_PROMPTS = ("The ", "def ", "Return a list of")


def run(config, workdir) -> dict:
    """Samples of the run's latest checkpoint and its ICL result; returns {"samples", "icl", "step"}."""
    workdir = pathlib.Path(workdir)
    model, tok, _, meta = checkpoint.load_run(workdir)
    sample_config = config.get("sample") or {}
    max_new_tokens = min(int(sample_config.get("max_new_tokens", 64)), model.spec.max_len // 2)
    prompts = list(sample_config.get("report_prompts", REPORT_PROMPTS))
    key = jax.random.key(int(config.get("seed", 0)))  # the same draws at each temperature: only it differs
    samples = []
    for temperature in sample_config.get("report_temperatures", (0.7, 1.0)):
        sampling = sample.Sampling.from_config(sample_config, temperature=float(temperature))
        for c in sample.generate(model, tok, prompts, key, sampling, max_new_tokens):
            samples.append(dict(temperature=float(temperature), prompt=c.prompt, text=c.text,
                                finish_reason=c.finish_reason))
    (workdir / "samples.json").write_text(json.dumps(samples, indent=1, ensure_ascii=False))
    icl_result = icl.evaluate(model, tok, shots=tuple(sample_config.get("icl_shots", (0, 1, 4))),
                              n_queries=int(sample_config.get("icl_queries", 32)), seed=int(config.get("seed", 0)))
    icl_result["step"] = meta.get("step")
    (workdir / "icl.json").write_text(json.dumps(icl_result, indent=1))
    return {"samples": samples, "icl": icl_result, "step": meta.get("step")}


def markdown(result: dict) -> list:
    """The stage's lines of report.md: each sample in a code block, then the ICL table."""
    lines = []
    for s in result.get("samples", []):
        lines += [f"**temperature {s.get('temperature')}**, prompt `{s.get('prompt')!r}`:", "", "```",
                  str(s.get("text", "")), "```", ""]
    if result.get("icl"):
        lines += ["### In-context learning", "", icl.markdown(result["icl"])]
    return lines
