"""Supervised fine-tuning: conversations in the chat template, loss on the assistant's tokens only, through the one
loop (only the batches and the evaluations are SFT's own).

    python -m lm.main --workdir=W                                   # once: W/tokenizer/ and the pretrained W/checkpoints/
    python -m lm.train --config=configs/sft_tiny.py --workdir=W     # SFT -> W/sft/

W is the pipeline workdir. The run starts from the pretrained checkpoint `config.sft.init_from` (a run or checkpoints
directory; "" is W itself) at `config.sft.init_step` (0: its latest) and writes its own run directory W/sft/:
checkpoints/, metrics.jsonl, tb/, data/ (the conversations as token + loss-mask shards, lm.data.tokenize: a "train"
split and one held-out split per source, read one conversation per row by lm.data.pipeline's `document` packing; a
resumed run reads the very shards the first one wrote), eval_before.json (the starting model's evaluation) and
sft_report.json.

Data, `config.sft.tasks` (name -> {"n": training conversations, the task's constructor arguments}): the synthetic
tasks of lm.eval.tasks, their "train" split for training and their held-out "test" split for evaluation, so the
default mix needs nothing but the repository. `config.sft.inputs` adds conversation files (jsonl / json of messages,
ShareGPT, Alpaca, ...; lm.data.conversations reads them and counts what it rejects); a file conversation is held
out when a hash of its messages falls below `config.sft.held_out_fraction`.

Evaluation (`evaluate_model`, before and after training; the greedy part also every train.eval_every steps through
Objective.evals, logged as "heldout/<task>_exact_match" and "heldout/<task>_ended"):
- assistant-token loss on the held-out conversations, overall and per source (the loop's val_loss is the overall);
- per task, on `config.sft.eval_examples` held-out prompts, greedy: exact match (the task's reward is 1), the
  fraction of answers that end with <|assistant_end|> within `eval_max_new_tokens` (a model that never stops is
  the classic SFT bug) and the format reward, with a few rendered conversations (prompt, thinking, answer);
- for the tasks in `config.sft.pass_k_tasks`, pass@1 and pass@k of `pass_k_samples` samples at temperature 1.
"""
import functools
import hashlib
import json
import pathlib
import shutil
import time
from typing import NamedTuple

import jax
from absl import logging
from flax import nnx

from lm import checkpoint as lm_checkpoint
from lm import config as lm_config
from lm import mesh as lm_mesh
from lm import model as lm_model
from lm import tokenizer as lm_tokenizer
from lm.data import conversations, pipeline, tokenize
from lm.eval import tasks as lm_tasks
from lm.sample import Sampling
from lm.tokenizer import chat
from lm.train import loop, losses
from lm.train.pretrain import resolve_vocab

TASKS = {"arithmetic": lm_tasks.Arithmetic, "count_letters": lm_tasks.CountLetters, "identity": lm_tasks.Identity,
         "compare_decimals": lm_tasks.CompareDecimals}
FILES = "files"            # the held-out source name of conversations from config.sft.inputs
REPORT = "sft_report.json"
BEFORE = "eval_before.json"


# --- tasks and data ------------------------------------------------------------------------------------------------

def make_tasks(sft_config) -> dict:
    """name -> lm.eval.tasks Task from config.sft.tasks (each {"n", constructor arguments}); errors name the key."""
    out = {}
    for name, settings in sft_config.tasks.items():
        if name not in TASKS:
            raise lm_config.ConfigError(f"config.sft.tasks.{name}: unknown task (known: {', '.join(TASKS)})")
        arguments = {k: v for k, v in settings.items() if k != "n"}
        try:
            out[name] = TASKS[name](**arguments)
        except (TypeError, ValueError) as error:
            raise lm_config.ConfigError(f"config.sft.tasks.{name}: {error}") from None
    return out


def _task_conversations(name, task, split: str, n: int, seed: int) -> list:
    return [conversations.Conversation(e.conversation, f"{name}:{split}", i)
            for i, e in enumerate(task.examples(split, n, seed=seed), 1)]


def _held_out(messages, fraction: float) -> bool:
    digest = hashlib.blake2b(json.dumps(messages, sort_keys=True).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2.0 ** 64


def build_data(config, task_set: dict) -> tuple[dict, dict]:
    """({"train": [Conversation], <source>: [held-out Conversation], ...}, stats): the tasks' train and test
    splits and the files of config.sft.inputs."""
    sft = config.sft
    train, held, stats = [], {}, {"sources": {}}
    for name, task in task_set.items():
        n = int(sft.tasks[name]["n"])
        train += _task_conversations(name, task, "train", n, config.seed)
        held[name] = _task_conversations(name, task, "test", int(sft.eval_examples), int(sft.eval_seed))
        stats["sources"][name] = dict(train=n, held_out=len(held[name]))
    if sft.inputs:
        found, read = conversations.load_conversations(list(sft.inputs))
        logging.info("sft inputs: %s", read.summary())
        for kind, n in read.by_reason.items():
            logging.warning("sft inputs: %d records rejected (%s); first ones in W/sft/data/data.json", n, kind)
        held[FILES] = [c for c in found if _held_out(c.messages, sft.held_out_fraction)]
        train += [c for c in found if not _held_out(c.messages, sft.held_out_fraction)]
        stats["sources"][FILES] = dict(train=len(found) - len(held[FILES]), held_out=len(held[FILES]))
        stats["files"] = read.to_dict()
        if not held[FILES]:
            del held[FILES]
    return {"train": train, **held}, stats


DATA_KEYS = ("tasks", "inputs", "held_out_fraction", "eval_examples", "eval_seed")   # of config.sft


def data_fingerprint(config, tokenizer) -> str:
    """What the rows depend on: config.sft's DATA_KEYS, seq_len, the seed and the tokenizer (not the eval settings,
    which a resumed run may change)."""
    sft = config.sft.to_dict()
    facts = dict(sft={key: sft[key] for key in DATA_KEYS}, seq_len=config.train.seq_len, seed=config.seed, tokenizer=tokenizer.hash)
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class SFTData(NamedTuple):
    """The tokenized conversations of a run: shards in `directory` (lm.data.tokenize.write_conversations, a "train"
    split and one held-out split per source) and `info`, its data.json (sources, counts, fingerprint)."""
    directory: pathlib.Path
    info: dict


def prepare_data(config, tokenizer, task_set: dict, run_dir: pathlib.Path) -> SFTData:
    """This run's data (see _prepare_data). With several processes, process 0 writes it while the others wait, then
    every process reads the same files (each would otherwise delete and rewrite the directory under the others)."""
    if jax.process_count() == 1:
        return _prepare_data(config, tokenizer, task_set, run_dir)
    from jax.experimental import multihost_utils
    if jax.process_index() == 0:
        _prepare_data(config, tokenizer, task_set, run_dir)
    multihost_utils.sync_global_devices("lm.train.sft data written")
    return SFTData(run_dir / "data", json.loads((run_dir / "data" / "data.json").read_text()))


def _prepare_data(config, tokenizer, task_set: dict, run_dir: pathlib.Path) -> SFTData:
    """The shards in run_dir/data/ when written before with the same fingerprint, else built and written there.
    A run that has checkpoints but other data (the data config changed) is an error."""
    data_dir = run_dir / "data"
    fingerprint = data_fingerprint(config, tokenizer)
    info_path = data_dir / "data.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info["fingerprint"] == fingerprint and (data_dir / tokenize.INDEX_FILE).exists():
            logging.info("sft data from %s", data_dir)
            return SFTData(data_dir, info)
        if info["fingerprint"] != fingerprint and _has_checkpoints(run_dir):
            raise ValueError(f"{info_path}: the data was built from another data config (fingerprint "
                             f"{info['fingerprint']}, now {fingerprint}) and {run_dir} has checkpoints trained on "
                             f"it: use a new workdir, or delete {run_dir} to start SFT over")
        if info["fingerprint"] == fingerprint:
            logging.warning("%s: no shards (rows of an older layout?): rebuilding them from the same config", data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)   # the directory is this stage's alone
    splits, stats = build_data(config, task_set)
    index = tokenize.write_conversations(tokenizer, splits, data_dir, config.train.seq_len)
    info = dict(stats, fingerprint=fingerprint, splits=list(splits), rows=index["conversations"])
    info_path.write_text(json.dumps(info, indent=1, default=str))   # last: shards without data.json are rebuilt
    logging.info("sft data: %s", {name: rows["rows"] for name, rows in info["rows"].items()})
    return SFTData(data_dir, info)


def _has_checkpoints(run_dir) -> bool:
    try:
        return bool(lm_checkpoint.find_checkpoints(run_dir))
    except FileNotFoundError:
        return False


def held_out_splits(info: dict) -> list:
    """The held-out splits of data.json that hold a conversation, in source order."""
    return [name for name in info["splits"] if name != "train" and info["rows"][name]["rows"]]


def held_out_batches(data_dir, names, config):
    """This process's rows of the held-out batches of the splits `names`, one after the other: each conversation
    once, one per row (lm.data.pipeline's document packing, padded with <|pad|>, loss 0 off the assistant)."""
    for name in names:
        yield from pipeline.val_batches(data_dir, config.train.seq_len, config.train.batch_size, packing="document",
                                        split=name)


# --- evaluation ----------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _loss_sums(graphdef, params, batch, chunk: int):
    return losses.lm_loss(nnx.merge(graphdef, params), batch, chunk=chunk)


def held_out_loss(model, data: SFTData, config, mesh) -> dict:
    """Mean assistant-token loss (nats/token) of each held-out source and of all of them ("all"); None for a source
    whose conversations were all dropped."""
    graphdef, state = nnx.split(model)
    chunk = int(config.train.get("loss_chunk", 0) or 0)
    held = held_out_splits(data.info)
    out = {}
    for name, names in [("all", held)] + [(n, [n]) for n in data.info["splits"] if n != "train"]:
        batches = held_out_batches(data.directory, [n for n in names if n in held], config)
        out[name] = loop.evaluate(functools.partial(_loss_sums, graphdef, chunk=chunk), state, batches,
                                  mesh).get("val_loss")
    return out


def task_scores(model, tokenizer, task_set: dict, sft_config, n: int, shown: int = 0) -> dict:
    """task -> greedy exact match, end-token rate, format reward (and `shown` rendered answers) on n held-out
    prompts of each task."""
    out = {}
    for name, task in task_set.items():
        result = lm_tasks.evaluate(model, tokenizer, task, "test", n=n, seed=int(sft_config.eval_seed),
                                   max_new_tokens=int(sft_config.eval_max_new_tokens))
        out[name] = dict(exact_match=result["pass@1"], ended=result["ended"], format=result["format"],
                         examples=result["examples"], shown=result["shown"][:shown])
    return out


def pass_at_k(model, tokenizer, task_set: dict, sft_config) -> dict:
    """pass@1 and pass@k (k = pass_k_samples, temperature 1) of each task in sft_config.pass_k_tasks."""
    k, out = int(sft_config.pass_k_samples), {}
    for name in sft_config.pass_k_tasks:
        result = lm_tasks.evaluate(model, tokenizer, task_set[name], "test", n=int(sft_config.eval_examples),
                                   samples=k, ks=(1, k), sampling=Sampling(temperature=1.0),
                                   max_new_tokens=int(sft_config.eval_max_new_tokens), seed=int(sft_config.eval_seed))
        out[name] = {"pass@1": result["pass@1"], f"pass@{k}": result[f"pass@{k}"], "samples": k,
                     "temperature": 1.0, "examples": result["examples"], "ended": result["ended"]}
    return out


def evaluate_model(model, tokenizer, data: SFTData, task_set: dict, config, mesh) -> dict:
    """Everything the report shows of one model: held-out loss, per-task greedy scores with rendered answers,
    pass@k."""
    sft = config.sft
    tick = time.perf_counter()
    with jax.set_mesh(mesh):
        result = dict(assistant_loss=held_out_loss(model, data, config, mesh),
                      tasks=task_scores(model, tokenizer, task_set, sft, int(sft.eval_examples), int(sft.shown)),
                      pass_at_k=pass_at_k(model, tokenizer, task_set, sft))
    result["seconds"] = round(time.perf_counter() - tick, 1)
    return result


def _training_evals(tokenizer, task_set: dict, sft_config) -> dict:
    """Objective.evals: the greedy exact match and end-token rate of each task, every eval_every steps."""
    def heldout(model):
        scores = task_scores(model, tokenizer, task_set, sft_config, int(sft_config.train_eval_examples))
        return {f"{name}_{key}": s[key] for name, s in scores.items() for key in ("exact_match", "ended")}
    return {"heldout": heldout} if sft_config.train_eval_examples else {}


# --- the objective and the run -------------------------------------------------------------------------------------

def objective(config, data: SFTData, tokenizer, tokenizer_dir, task_set: dict, init_from) -> loop.Objective:
    """The SFT Objective: the pretraining loss on loss_mask (assistant tokens) over the conversation shards, one
    conversation per row in the pipeline's Feistel order (`document` packing)."""
    train = config.train
    held = held_out_splits(data.info)

    def train_batches(start_step):
        return pipeline.train_batches(data.directory, train.seq_len, train.batch_size, config.seed, start_step=start_step,
                                      packing="document")

    def eval_batches():
        return held_out_batches(data.directory, held, config)

    return loop.Objective(
        loss=losses.make_lm_loss(train),
        train_batches=train_batches,
        eval_batches=eval_batches if held else None,
        make_model=lambda: lm_model.Transformer(config.model, rngs=nnx.Rngs(config.seed)),
        flops_per_token=lm_model.flops_per_token(config.model, train.seq_len),
        evals=_training_evals(tokenizer, task_set, config.sft),
        meta=dict(objective="sft", tokenizer_hash=tokenizer.hash, tokenizer_name=tokenizer.name,
                  tokenizer_dir=str(pathlib.Path(tokenizer_dir).absolute()), data_seed=config.seed,
                  pad_id=chat.pad_id(tokenizer)),
        init_from=init_from,
        init_step=int(config.sft.init_step) or None,
    )


def _before(path: pathlib.Path, init_from, config, tokenizer, data, task_set, mesh) -> dict:
    """The starting model's evaluation (computed once; a resumed run reads it back)."""
    if path.exists():
        return json.loads(path.read_text())
    directory = lm_checkpoint.find_checkpoints(init_from)
    model, _, meta = lm_checkpoint.load_model(None, step=int(config.sft.init_step) or None, mesh=mesh,
                                              directory=directory)
    if meta.get("tokenizer_hash") and meta["tokenizer_hash"] != tokenizer.hash:
        raise ValueError(f"{directory}: the pretrained model was trained with tokenizer {meta['tokenizer_hash']}, "
                         f"not {tokenizer.hash} ({meta.get('tokenizer_dir')})")
    result = dict(evaluate_model(model, tokenizer, data, task_set, config, mesh),
                  checkpoint=f"{directory}/{meta['step']}", objective=meta.get("objective"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def headline(before: dict, after: dict) -> dict:
    """The numbers a report table shows: before -> after of the held-out loss and of each task's scores."""
    out = {"assistant_loss": [before["assistant_loss"]["all"], after["assistant_loss"]["all"]]}
    for name in after["tasks"]:
        for key in ("exact_match", "ended"):
            out[f"{name}/{key}"] = [before["tasks"][name][key], after["tasks"][name][key]]
    for name, scores in after["pass_at_k"].items():
        for key, value in scores.items():
            if key.startswith("pass@"):
                out[f"{name}/{key}"] = [before["pass_at_k"][name][key], value]
    return out


def run(config, workdir, stop_after: int | None = None) -> dict:
    """SFT of the pretrained model in `workdir` into <workdir>/sft/, resuming from its checkpoints; then the
    after-evaluation and <workdir>/sft/sft_report.json. Returns the loop's summary with the report's headline."""
    workdir = pathlib.Path(workdir)
    run_dir = workdir / "sft"
    tokenizer_dir = workdir / "tokenizer"
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"{tokenizer_dir} not found: SFT needs the pipeline workdir's tokenizer "
                                f"(python -m lm.main --workdir={workdir})")
    tokenizer = lm_tokenizer.load(tokenizer_dir)
    config = resolve_vocab(config, tokenizer.n_vocab)
    init_from = pathlib.Path(config.sft.init_from or workdir)
    task_set = make_tasks(config.sft)
    for name in config.sft.pass_k_tasks:
        if name not in task_set:
            raise lm_config.ConfigError(f"config.sft.pass_k_tasks: {name!r} is not in config.sft.tasks")
    data = prepare_data(config, tokenizer, task_set, run_dir)
    data_info = data.info
    if not data_info["rows"]["train"]["rows"]:
        raise ValueError(f"{run_dir / 'data' / 'data.json'}: no training conversation (every one was dropped: "
                         f"{data_info['rows']['train']})")
    mesh = lm_mesh.make_mesh(config.mesh)
    before = _before(run_dir / BEFORE, init_from, config, tokenizer, data, task_set, mesh)
    summary = loop.train(config, run_dir, objective(config, data, tokenizer, tokenizer_dir, task_set, init_from),
                         stop_after=stop_after)
    if summary["steps"] < config.train.steps:
        return summary   # stopped early (stop_after, or the batches ended): no report for an unfinished run
    model, _, meta = lm_checkpoint.load_model(run_dir, mesh=mesh)
    after = dict(evaluate_model(model, tokenizer, data, task_set, config, mesh),
                 checkpoint=f"{lm_checkpoint.checkpoint_dir(run_dir)}/{meta['step']}")
    report = dict(
        headline=headline(before, after), before=before, after=after, train=summary,
        init_from=meta.get("init_from"), seed=config.seed, eval_seed=int(config.sft.eval_seed),
        data={k: v for k, v in data_info.items() if k != "files"} | (
            {"files": {k: v for k, v in data_info["files"].items() if k != "examples"}} if "files" in data_info
            else {}),
        tasks=config.sft.tasks.to_dict(),
        run_dir=str(run_dir), metrics=str(run_dir / "metrics.jsonl"))
    (run_dir / REPORT).write_text(json.dumps(report, indent=1, default=str))
    logging.info("sft: %s", json.dumps(report["headline"]))
    return dict(summary, report=str(run_dir / REPORT), headline=report["headline"])
