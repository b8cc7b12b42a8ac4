"""The whole seed from one config into one workdir: corpus → filter → tokenizer → tokens → pretrain → sample →
SFT → reward model → DPO → PPO → reward-hacking probe → GRPO → report.md.

    python -m lm.main --config=configs/tiny.py --workdir=runs/tiny [--data=<paths or globs>] [--force]

A stage that already ran on the same inputs and config sections is skipped; a change re-runs it and the stages
after it (`--force` redoes every stage; `--stages` picks some).
Each stage is also a module of its own (`python -m lm.data.filter`, `python -m lm.train`, ...). A post-training
stage runs the preset named in config.posttrain.<stage> (e.g. configs/sft_tiny.py, the same file `python -m lm.train
--config=...` takes) with the pipeline's model, mesh and seed, plus config.posttrain.overrides.<stage>.
"""
import dataclasses
import fnmatch
import glob
import hashlib
import importlib
import json
import pathlib
import shutil
import time
from typing import Callable

from absl import app, flags, logging

from lm import config as lm_config
from lm import mesh as lm_mesh

BUNDLED_CORPUS = "corpus/python_docs.jsonl.gz"
WEB_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz", ".html", ".html.gz", ".htm", ".htm.gz")


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    outputs: tuple          # paths (globs) relative to the workdir that --force removes first
    run: Callable           # run(config, workdir, inputs) -> dict of results for the report
    keys: tuple = ()        # config sections whose change makes the stage (and those after it) run again
    needs: tuple = ()       # paths (relative to the workdir) that earlier stages write and this one reads
    typical_s: float = 0    # seconds it took in the default run (configs/tiny.py, bundled data) on 2 quiet cores


def run_corpus(config, workdir, inputs):
    from lm.data import bundled
    n = bundled.write_corpus(workdir / BUNDLED_CORPUS)
    return {"documents": n, "source": "bundled CPython documentation"}


def run_filter(config, workdir, inputs):
    from lm.data import filter as data_filter
    section = config.filter
    if section.preset == "bundled" and inputs != [str(workdir / BUNDLED_CORPUS)]:
        # The bundled preset's loosened thresholds are for CPython's docs; other data gets FineWeb's own recipe.
        preset = "web" if any(str(i).endswith(WEB_SUFFIXES) for i in inputs) else "text"
        logging.info("filter: --data given, using the %r preset instead of 'bundled'", preset)
        section = data_filter.default_config(preset)
    return data_filter.run(section, inputs, workdir)


def run_tokenizer(config, workdir, inputs):
    from lm import tokenizer
    out = workdir / "tokenizer"
    if config.tokenizer.kind == "pretrained":
        tok = tokenizer.load(config.tokenizer.name)
        tok.save(out)
        return {"name": tok.name, "n_vocab": tok.n_vocab, "hash": tok.hash}
    from lm.data import train_tokenizer
    tok, stats = train_tokenizer.run([str(workdir / "text" / "*.jsonl.gz")], config.tokenizer.vocab_size, out,
                                     backend=config.tokenizer.kind, max_chars=config.tokenizer.max_chars)
    return {"name": tok.name, "n_vocab": tok.n_vocab, "hash": tok.hash, "documents": stats.to_dict()}


def run_tokenize(config, workdir, inputs):
    from lm import tokenizer
    from lm.data import tokenize
    tok = tokenizer.load(workdir / "tokenizer")
    return tokenize.run(tok, [str(workdir / "text" / "*.jsonl.gz")], workdir / "tokens", config.dataset)


def run_pretrain(config, workdir, inputs):
    from lm.data import pipeline
    from lm.train import metrics, pretrain
    summary = pretrain.run(config, workdir)
    unigram = pipeline.unigram_loss(workdir / "tokens")
    metrics.plot_losses(workdir / "metrics.jsonl", workdir / "loss.png", baseline=unigram)
    return {**summary, "unigram_val_loss": unigram, "plot": "loss.png"}


def run_sample(config, workdir, inputs):
    from lm.eval import report
    return report.run(config, workdir)


def stage_config(config, name: str):
    """The config a post-training stage runs with: its preset (config.posttrain.<name>) and overrides, with the
    pipeline's model, mesh and seed (so shapes match the pretrained checkpoint)."""
    overrides = list((config.posttrain.get("overrides") or {}).get(name) or ())
    stage = lm_config.load(config.posttrain[name], overrides)
    for key in ("model", "mesh", "seed"):
        stage[key] = config[key]
    return lm_config.validate(stage)


def posttrain_stage(name: str, module: str, needs: tuple, outputs: tuple, typical_s: float) -> Stage:
    """A Stage that runs lm.train.<module>.run(stage_config, workdir), fingerprinted by its whole stage config."""
    def run(config, workdir, inputs):
        return importlib.import_module(f"lm.train.{module}").run(stage_config(config, name), workdir)
    return Stage(name, outputs, run, keys=(lambda config: stage_config(config, name),), needs=needs,
                 typical_s=typical_s)


# typical_s: the default run's stage times on 2 quiet cores (see the README's quick start), shown as the expected time
STAGES = (
    Stage("corpus", ("corpus",), run_corpus, ("data",), typical_s=2),
    Stage("filter", ("text", "dropped", "filter*"), run_filter, ("filter",), typical_s=10),
    Stage("tokenizer", ("tokenizer",), run_tokenizer, ("tokenizer",), typical_s=1),
    Stage("tokenize", ("tokens",), run_tokenize, ("dataset",), typical_s=1),
    Stage("pretrain", ("checkpoints", "metrics.jsonl", "tb", "*.png"), run_pretrain, ("seed", "model", "train", "mesh"),
          typical_s=87),
    Stage("sample", (), run_sample, ("sample",), needs=("checkpoints",), typical_s=5),
    posttrain_stage("sft", "sft", ("checkpoints", "tokenizer"), ("sft",), typical_s=40),
    posttrain_stage("reward", "reward", ("sft/checkpoints",), ("reward",), typical_s=19),
    posttrain_stage("dpo", "dpo", ("sft/checkpoints",), ("dpo",), typical_s=38),
    posttrain_stage("ppo", "ppo", ("sft/checkpoints", "reward/checkpoints"), ("ppo",), typical_s=17),
    posttrain_stage("hacking", "hacking", ("sft/checkpoints",), ("hacking",), typical_s=28),
    posttrain_stage("grpo", "grpo", ("sft/checkpoints",), ("grpo",), typical_s=100),
)


def run_pipeline(config, workdir, data=(), force=False, only=()) -> dict:
    """Runs the stages in order; returns {stage: results}. A stage is done when <workdir>/stages/<name>.json holds the
    fingerprint of the inputs and of its config sections and those of the stages before it."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = list(data) or list(config.data.inputs)
    inputs = data or [str(workdir / BUNDLED_CORPUS)]
    unknown = set(only) - {s.name for s in STAGES}
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; known: {[s.name for s in STAGES]}")
    results, started = {}, time.time()
    skip = set(config.posttrain.get("skip") or ()) if "posttrain" in config else set()
    fingerprint = _fingerprint(inputs)
    for i, stage in enumerate(STAGES, 1):
        fingerprint = _fingerprint([fingerprint] + [key(config) if callable(key) else config.get(key)
                                                    for key in stage.keys])
        if (only and stage.name not in only) or (stage.name == "corpus" and data) or stage.name in skip:
            continue
        done_marker = workdir / "stages" / f"{stage.name}.json"
        done = json.loads(done_marker.read_text()) if done_marker.exists() else {}
        if done.get("fingerprint") == fingerprint and not force:
            results[stage.name] = done
            logging.info("[%d/%d] %s: done already (%s); --force redoes it", i, len(STAGES), stage.name, done_marker)
            continue
        if done:
            logging.info("[%d/%d] %s: inputs or config changed since it ran; running it again", i, len(STAGES),
                         stage.name)
        if force:
            for output in stage.outputs:
                _remove(workdir / output)
        _check_needs(stage, workdir)
        logging.info("[%d/%d] %s ... (%s since the pipeline started; expected ~%s, as in the default run on 2 "
                     "cores)", i, len(STAGES), stage.name, _clock(time.time() - started), _clock(stage.typical_s))
        start = time.time()
        result = stage.run(config, workdir, inputs) or {}
        result = {**result, "seconds": round(time.time() - start, 1), "fingerprint": fingerprint}
        done_marker.parent.mkdir(exist_ok=True)
        done_marker.write_text(json.dumps(result, indent=1, default=str))
        results[stage.name] = result
        logging.info("[%d/%d] %s finished in %.1fs", i, len(STAGES), stage.name, result["seconds"])
    write_report(workdir, results)
    return results


def _check_needs(stage: Stage, workdir: pathlib.Path) -> None:
    """A stage whose inputs are missing says which stage writes them."""
    for need in stage.needs:
        if not (workdir / need).exists():
            top = need.split("/")[0]
            writer = next((s.name for s in STAGES if any(fnmatch.fnmatch(top, o) for o in s.outputs)), "an earlier one")
            raise FileNotFoundError(f"stage {stage.name} needs {workdir / need}, which stage {writer!r} writes: run "
                                    f"`python -m lm.main --workdir={workdir} --stages={writer}` first (or all stages)")


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _fingerprint(values) -> str:
    text = json.dumps([v.to_dict() if hasattr(v, "to_dict") else v for v in values], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _remove(path: pathlib.Path):
    for match in glob.glob(str(path)):
        shutil.rmtree(match) if pathlib.Path(match).is_dir() else pathlib.Path(match).unlink()


def write_report(workdir: pathlib.Path, results: dict) -> None:
    """<workdir>/report.md, and the same page as a self-contained report.html (images inlined)."""
    from lm import report
    text = report.render(workdir, results)
    (workdir / "report.md").write_text(text)
    (workdir / "report.html").write_text(report.render_html(workdir, text))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    lm_mesh.initialize_distributed()
    config = lm_config.validate(FLAGS.config)
    run_pipeline(config, FLAGS.workdir, FLAGS.data, FLAGS.force, FLAGS.stages)
    logging.info("report: %s", pathlib.Path(FLAGS.workdir) / "report.md")


if __name__ == "__main__":
    lm_config.define_config_flag()
    flags.DEFINE_string("workdir", "runs/default", "Directory for every output of the pipeline.")
    flags.DEFINE_list("data", [], "Corpus files or globs (WARC, HTML, jsonl, parquet, txt). "
                                  "Default: config.data.inputs, else the bundled corpus (CPython's documentation).")
    flags.DEFINE_bool("force", False, "Redo stages whose outputs already exist.")
    flags.DEFINE_list("stages", [], "Run only these stages (default: all, in order).")
    lm_mesh.define_distributed_flags()
    app.run(main)
