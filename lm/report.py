"""<workdir>/report.md: what each stage of lm.main did, in numbers, with the loss plot and samples.

It sits with lm.main (the top of the imports): it renders every stage's results, so it may import any of them.
"""
import pathlib


def render(workdir: pathlib.Path, results: dict) -> str:
    lines = [f"# lm report: `{workdir}`", ""]
    lines += ["| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {r.get('seconds', '')} |" for name, r in results.items()]
    for name, result in results.items():
        lines += ["", f"## {name}", ""]
        lines += _RENDERERS.get(name, _scalars)(workdir, result)
    return "\n".join(lines) + "\n"


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


_RENDERERS = {"filter": _filter, "pretrain": _pretrain, "sample": _sample}
