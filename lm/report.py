"""<workdir>/report.md: what each stage of lm.main did, in numbers, with the plots and samples (the GRPO pass@k
curve is drawn here, from grpo_report.json, into <workdir>/grpo/pass_at_k.png).

It sits with lm.main (the top of the imports): it renders every stage's results, so it may import any of them.
"""
import base64
import json
import pathlib
import re


# The report file a post-training stage writes into its run directory; the other stages' results are their report.
STAGE_REPORTS = {name: f"{name}/{name}_report.json" for name in ("sft", "reward", "dpo", "ppo", "hacking", "grpo")}


def render(workdir: pathlib.Path, results: dict) -> str:
    workdir = pathlib.Path(workdir)
    reports = {name: _stage_report(workdir, name) or result for name, result in results.items()}  # each read once
    lines = [f"# lm report: `{workdir}`", ""]
    lines += ["| stage | seconds | headline |", "|---|---|---|"]
    lines += [f"| {name} | {r.get('seconds', '')} | {_headline(name, reports[name])} |" for name, r in results.items()]
    for name in results:
        lines += ["", f"## {name}", ""]
        lines += _RENDERERS.get(name, _scalars)(workdir, reports[name])
    return "\n".join(lines) + "\n"


HTML_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>lm report</title><style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }}
table {{ border-collapse: collapse; margin: 0.5rem 0; }} th, td {{ border: 1px solid #ccc; padding: 0.2rem 0.5rem; }}
pre {{ background: #f5f5f5; padding: 0.6rem; overflow-x: auto; }} img {{ max-width: 100%; }}
</style></head><body>
{body}
</body></html>
"""


def render_html(workdir: pathlib.Path, markdown_text: str) -> str:
    """report.md as one self-contained HTML page: tables rendered, images inlined as data URIs (no other files)."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"])

    def inline(match):
        path = pathlib.Path(workdir) / match.group(2)
        if not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode()
        return f'{match.group(1)}data:image/png;base64,{data}"'
    return HTML_PAGE.format(body=re.sub(r'(<img[^>]* src=")([^"]+)"', inline, body))


def _headline(name: str, report: dict) -> str:
    """One number per stage for the summary table, from the stage's report (see `render`)."""
    def pair(before, after, fmt="{:.3g}"):
        return f"{fmt.format(before)} → {fmt.format(after)}" if before is not None and after is not None else ""
    try:
        if name == "filter":
            return f"{report['documents_kept']} of {report['documents_in']} documents kept"
        if name == "tokenizer":
            return f"{report['n_vocab']} tokens"
        if name == "pretrain":
            return f"val loss {report['val_loss']:.3f} (unigram {report['unigram_val_loss']:.3f})"
        if name == "sft":
            loss = report["headline"]["assistant_loss"]
            return f"held-out assistant loss {pair(*loss)}"
        if name in ("reward", "dpo"):
            key = "accuracy" if name == "reward" else "reward_accuracy"
            return f"held-out pair accuracy {pair(report['held_out_before'][key], report['held_out'][key])}"
        if name == "ppo":
            return f"reward-model score {pair(report['first']['score'], report['last']['score'])}"
        if name == "grpo":
            return f"greedy pass@1 {pair(report['before']['greedy_pass@1'], report['after']['greedy_pass@1'])}"
    except (KeyError, TypeError):
        return ""
    return ""


def _scalars(workdir, result) -> list:
    rows = [(k, v) for k, v in result.items() if isinstance(v, (int, float, str)) and k != "fingerprint"]
    return [f"- {k}: {_fmt(v)}" for k, v in rows]


def _fmt(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _filter(workdir, result) -> list:
    lines = _scalars(workdir, result)
    blocks = result.get("blocks") or []
    if blocks:
        lines += ["", "| block | documents in | kept | dropped | top reasons |", "|---|---|---|---|---|"]
        for b in blocks:
            reasons = sorted((b.get("reasons") or {}).items(), key=lambda kv: -kv[1])[:4]
            lines.append(f"| {b.get('block')} | {b.get('docs_in', '')} | {b.get('docs_out', '')} | "
                         f"{b.get('dropped', '')} | {', '.join(f'{k} {v}' for k, v in reasons)} |")
    return lines


def _pretrain(workdir, result) -> list:
    lines = _scalars(workdir, result)
    if result.get("val_loss") is not None and result.get("unigram_val_loss") is not None:
        lines += ["", f"Validation loss {result['val_loss']:.3f} nats/token against {result['unigram_val_loss']:.3f} "
                      "for a unigram model of the training tokens (a model that ignores context)."]
    plot = result.get("plot")
    if plot and (workdir / plot).exists():
        lines += ["", f"![train and validation loss]({plot})"]
    return lines


def _sample(workdir, result) -> list:
    from lm.eval import report as eval_report
    return eval_report.markdown(result)


def _stage_report(workdir: pathlib.Path, name: str) -> dict:
    """A post-training stage's own report file (STAGE_REPORTS), {} when it is not there or the stage has none."""
    path = workdir / STAGE_REPORTS[name] if name in STAGE_REPORTS else None
    return json.loads(path.read_text()) if path and path.exists() else {}


def _table(rows: list[tuple], header: tuple) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(v) if v is not None else "" for v in row) + " |" for row in rows]


def _before_after(before: dict, after: dict, keys) -> list:
    return _table([(key, (before or {}).get(key), (after or {}).get(key)) for key in keys
                   if key in (before or {}) or key in (after or {})], ("metric", "before", "after"))


def _sft(workdir, report) -> list:
    lines = [f"Supervised fine-tuning from the pretrained model, {report.get('train', {}).get('steps')} steps; "
             "held-out conversations (exact match is greedy; `ended`: the answer ends with <|assistant_end|>):"]
    rows = [(name, before, after) for name, (before, after) in (report.get("headline") or {}).items()]
    lines += [""] + _table(rows, ("metric", "before", "after"))
    tasks = (report.get("after") or {}).get("tasks") or {}
    for task, scores in list(tasks.items())[:1]:
        for one in (scores.get("shown") or [])[:1]:
            lines += ["", f"A held-out {task} conversation after SFT:", "", "```", f"user:      {one.get('prompt')}",
                      f"thinking:  {one.get('thinking')}", f"assistant: {one.get('answer')}   (reference "
                      f"{one.get('reference')}, reward {one.get('reward')})", "```"]
    return lines


def _reward(workdir, report) -> list:
    lines = [f"Bradley-Terry reward model (scalar head on the SFT trunk), {report.get('steps')} steps."]
    return lines + [""] + _before_after(report.get("held_out_before"), report.get("held_out"), ("accuracy", "margin"))


def _dpo(workdir, report) -> list:
    lines = [f"DPO from the SFT model (frozen reference), beta {report.get('beta')}, {report.get('steps')} steps; "
             "held-out preference pairs:"]
    return lines + [""] + _before_after(report.get("held_out_before"), report.get("held_out"),
                                        ("reward_accuracy", "reward_margin"))


def _ppo(workdir, report) -> list:
    first, last = report.get("first") or {}, report.get("last") or {}
    keys = ("score", "kl", "kl_k3", "response_length", "end_rate", "value_explained_variance", "logprob_diff", "value_diff")
    lines = ["PPO against the reward model with a KL penalty to the SFT reference: first and last rollout."]
    lines += [""] + _table([(k, first.get(k), last.get(k)) for k in keys if k in first or k in last],
                           ("metric", "first rollout", "last rollout"))
    for name, when in (("samples_first", "first"), ("samples_last", "last")):
        samples = report.get(name)
        if isinstance(samples, list) and samples:
            sample = samples[0]
            lines += ["", f"A {when}-rollout answer: `{str(sample.get('answer', sample))[:300]}`"]
    return lines


def _hacking(workdir, report) -> list:
    lines = ["Reward hacking, measured: PPO against proxy reward models trained on gold-labelled pairs; proxy and "
             "gold reward against sqrt(KL), best-of-n against the same proxy as the comparison curve."]
    lines += [""] + [f"- {line}" for line in (report.get("summary") or {}).values()]
    lines += [f"- {d['line']}" for d in (report.get("delays") or {}).values() if "line" in d]
    lines += [f"- {line}" for line in report.get("held_out_lines") or ()]
    if (report.get("proxy_accuracy") or {}).get("line"):
        lines.append(f"- {report['proxy_accuracy']['line']}")
    if (pathlib.Path(workdir) / "hacking" / "hacking.png").exists():
        lines += ["", "![proxy and gold reward vs sqrt(KL)](hacking/hacking.png)"]
    return lines


GRPO_PLOT = "grpo/pass_at_k.png"


def _grpo(workdir, report) -> list:
    before, after = report.get("before") or {}, report.get("after") or {}
    lines = [f"GRPO on `{report.get('task')}` ({report.get('task_kwargs')}), {report.get('steps')} steps; held-out "
             "problems, greedy pass@1 and sampled pass@k:"]
    keys = ("greedy_pass@1", *_pass_at_k_keys({**before, **after}), "reward", "format", "ended")
    lines += [""] + _before_after(before, after, keys)
    series = pass_at_k_series(report.get("curve") or [])
    if any(len(points) > 1 for points in series.values()):
        plot_pass_at_k(series, workdir / GRPO_PLOT)
        lines += ["", f"![greedy pass@1 and sampled pass@k over GRPO steps]({GRPO_PLOT})"]
    shown, when = report.get("after_shown"), "after GRPO"
    if not shown:
        shown, when = report.get("before_shown"), "before GRPO"
    if shown:
        one = next((s for s in shown if s.get("thinking")), shown[0])   # one that thought, when one did
        lines += ["", f"One held-out completion {when}, its thinking in full:", "", "```",
                  f"prompt:   {one.get('prompt')}", f"thinking: {one.get('thinking')}",
                  f"answer:   {one.get('answer')}   (reward {one.get('reward')}, reference {one.get('reference')})",
                  "```"]
    return lines


def _pass_at_k_keys(numbers: dict) -> list[str]:
    """pass@1, pass@2, ... of an evaluation, by k."""
    return sorted((k for k in numbers if re.fullmatch(r"pass@\d+", k)), key=lambda k: int(k.split("@")[1]))


def pass_at_k_series(curve: list[dict]) -> dict[str, list[tuple]]:
    """{"greedy pass@1": [(step, value), ...], "sampled pass@k": ...} from grpo_report.json's curve (step 0: the
    init model before RL; then each evaluation the run logged as eval/<key> in its metrics.jsonl)."""
    keys = ["greedy_pass@1"] + _pass_at_k_keys({k: v for c in curve for k, v in c.items()})
    series = {}
    for key in keys:
        points = [(c["step"], c[key]) for c in curve if c.get(key) is not None]
        if points:
            series["greedy pass@1" if key == "greedy_pass@1" else f"sampled {key}"] = points
    return series


def plot_pass_at_k(series: dict[str, list[tuple]], png_path: pathlib.Path) -> pathlib.Path:
    """The series of `pass_at_k_series` against the GRPO step as a PNG: greedy solid, sampled dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        ax.plot(*zip(*points), "o-" if label.startswith("greedy") else "o--", ms=3, label=label)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("fraction of held-out problems solved")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


_RENDERERS = {"filter": _filter, "pretrain": _pretrain, "sample": _sample, "sft": _sft, "reward": _reward, "dpo": _dpo,
              "ppo": _ppo, "hacking": _hacking, "grpo": _grpo}
