"""<workdir>/report.md: what each stage of lm.main did, in numbers, with the loss plot and samples."""
import json
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
        lines += ["", "| block | in | kept | dropped | top reasons |", "|---|---|---|---|---|"]
        for b in blocks:
            reasons = ", ".join(f"{k} {v}" for k, v in list((b.get("reasons") or {}).items())[:4])
            lines.append(f"| {b.get('name')} | {b.get('in', '')} | {b.get('kept', '')} | {b.get('dropped', '')} | "
                         f"{reasons} |")
    return lines


def _pretrain(workdir, result) -> list:
    lines = _scalars(workdir, result)
    plot = result.get("plot")
    if plot and (workdir / plot).exists():
        lines += ["", f"![train and validation loss]({plot})"]
    return lines


def _sample(workdir, result) -> list:
    lines = []
    for s in result.get("samples", []):
        lines += [f"**temperature {s.get('temperature')}**, prompt `{s.get('prompt')!r}`:", "", "```",
                  str(s.get("text", "")), "```", ""]
    icl = result.get("icl")
    if icl:
        lines += ["### In-context learning", "", "```json", json.dumps(icl, indent=1, default=str)[:4000], "```"]
    return lines


_RENDERERS = {"filter": _filter, "pretrain": _pretrain, "sample": _sample}
