"""The models a server offers and the engine thread that batches their requests into `lm.sample.stream`.

    models = Models(workdir)                # finds base/, sft/, ppo/, grpo/ runs; loads each on first use
    engine = Engine(models, max_batch=16, window_s=0.01)
    engine.submit(Job("sft", [ids] * n, max_tokens=64, temperature=0.7, top_p=1.0, seed=3, stop_ids=(end, eot),
                      emit=callback))       # callback(events) is called from the engine thread
    ...
    engine.close()

One thread runs every decode (JAX work stays on one thread; the web server's event loop never waits on the device).
It takes the oldest waiting job, waits `window_s` for more to arrive, and decodes every compatible waiting job (same
model, same top-p and stop tokens, fitting in the context together, at most `max_batch` rows) as ONE `sample.stream`
batch: per-row temperatures (0: greedy) and one PRNG key per row, `fold_in(key(seed), choice)`, so a row's tokens
depend on its own request only, never on what it was batched with. Each step's tokens are handed to each job's
`emit` as a list of events; a job ends row by row (its stop token, its own max_tokens, a stop string its consumer
found, or its client leaving), and the batch ends when all its rows have. Jobs that arrive meanwhile wait for the
next batch (no rows join a running batch: lm.sample has no way to add rows to a live KV cache).

Compiles are kept few: the batch is padded with dummy rows to a power of two, and its decode length is rounded up to
a power of two (within the context), since lm.sample compiles per batch size, prompt bucket and decode length.
"""
import collections
import dataclasses
import pathlib
import threading
import time
import traceback
from typing import Callable

import jax
import numpy as np
from absl import logging

from lm import chat, checkpoint, sample
from lm.tokenizer import chat as template

MODEL_ORDER = (chat.BASE,) + tuple(reversed(chat.CHAT_STAGES))  # how /v1/models lists them: base, sft, ppo, grpo


# ------------------------------------------------------------------------------------------------ the models


def find_models(workdir) -> dict[str, pathlib.Path]:
    """{model name: run directory} of every stage run with checkpoints in `workdir`, in MODEL_ORDER.

    The names are lm.chat's stage names: base (the pretrained run, workdir itself), sft, ppo, grpo (workdir/<stage>).
    A workdir that is itself a stage run (e.g. W/sft) offers that one model, under its stage name.
    """
    workdir = pathlib.Path(workdir)
    found = {}
    for stage in chat.CHAT_STAGES:
        if (workdir / stage).is_dir():
            try:
                found[stage] = chat.find_chat_run(workdir, stage)[0]
            except FileNotFoundError:
                pass
    try:
        # with stage runs inside, workdir is the base model; alone, it is whatever stage its name says
        path, stage = chat.find_chat_run(workdir, chat.BASE if found else None)
        found.setdefault(stage, path)
    except FileNotFoundError:
        pass
    if not found:
        raise FileNotFoundError(f"{workdir}: no model to serve: no checkpoints in {workdir}/checkpoints nor in "
                                f"{', '.join(f'{workdir}/{s}/' for s in chat.CHAT_STAGES)}")
    return {name: found[name] for name in MODEL_ORDER if name in found}


@dataclasses.dataclass
class LoadedModel:
    name: str
    path: pathlib.Path
    model: object
    tokenizer: object
    config: object
    meta: dict

    @property
    def max_len(self) -> int:
        return self.model.spec.max_len

    @property
    def chat_stop_ids(self) -> tuple:
        """What ends a chat answer: <|assistant_end|>, and end-of-text (where a base model ends its turn)."""
        return (self.tokenizer.token_id(template.ASSISTANT_END), self.tokenizer.eot_id)


class Models:
    """The models found in a workdir; each is loaded (lm.checkpoint.load_run) on first use and then kept."""

    def __init__(self, workdir, step: int | None = None):
        self.paths = find_models(workdir)
        self.step = step
        self.default = chat.find_chat_run(workdir)[1]   # what lm.chat would pick: the most trained stage
        if self.default not in self.paths:
            self.default = next(reversed(self.paths))
        # when each model's latest checkpoint was written (for /v1/models), known without loading it
        self.created = {name: int(checkpoint.find_checkpoints(path).stat().st_mtime)
                        for name, path in self.paths.items()}
        self._loaded: dict[str, LoadedModel] = {}
        self._locks = {name: threading.Lock() for name in self.paths}

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    def loaded(self, name: str) -> LoadedModel | None:
        return self._loaded.get(name)

    def get(self, name: str) -> LoadedModel:
        """The model `name` (KeyError if there is none), loading it if it is not yet (slow: call off the event loop)."""
        if name not in self.paths:
            raise KeyError(name)
        with self._locks[name]:
            if name not in self._loaded:
                started = time.monotonic()
                model, tokenizer, config, meta = checkpoint.load_run(self.paths[name], step=self.step)
                self._loaded[name] = LoadedModel(name, self.paths[name], model, tokenizer, config, meta)
                logging.info("loaded %s from %s (step %s) in %.1fs", name, self.paths[name], meta.get("step"),
                             time.monotonic() - started)
            return self._loaded[name]


# ------------------------------------------------------------------------------------------------ jobs and events


# Events a job's `emit` receives, a list per step: ("token", row, token_id, logprob), ("finish", row, reason) with
# reason "stop" (a stop token) or "length" (the job's max_tokens), ("error", message) when the decode failed.
Event = tuple


@dataclasses.dataclass(eq=False)
class Job:
    """One request's decode: one row per prompt (a chat request's n choices are n copies of its prompt)."""
    model: str
    prompts: list               # token-id lists, one per row
    max_tokens: int
    temperature: float          # 0: greedy
    top_p: float
    seed: int
    stop_ids: tuple
    emit: Callable[[list], None]
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    ended_rows: set = dataclasses.field(default_factory=set)   # rows the consumer ended (a stop string)

    def end_row(self, row: int) -> None:
        """The consumer needs no more tokens of `row` (thread-safe: a set add)."""
        self.ended_rows.add(row)

    @property
    def longest(self) -> int:
        return max(map(len, self.prompts))

    @property
    def sampled(self) -> bool:
        return self.temperature > 0


def row_key(seed: int, row: int):
    """The PRNG key of a request's row: its seed (any 64-bit int) folded with the row (choice) index."""
    key = jax.random.fold_in(jax.random.key(seed % 2**32), (seed >> 32) % 2**32)
    return jax.random.fold_in(key, row)


def next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def decode_length(max_tokens: int, longest: int, max_len: int) -> int:
    """Steps a batch decodes: max_tokens rounded up to a power of two where the context allows (each distinct
    length is a compile), else exactly what the context leaves."""
    rounded = min(next_power_of_two(max_tokens), max_len - sample.bucket(longest))
    return rounded if rounded >= max_tokens else max_len - longest


def default_room(prompt_len: int, max_len: int) -> int:
    """Tokens a request that sets no max_tokens may get: what the context leaves after the padded prompt (so its
    decode length is one of few), or after the prompt itself when that is all there is."""
    return max(max_len - sample.bucket(prompt_len), 0) or max_len - prompt_len


# ------------------------------------------------------------------------------------------------ the engine


class Engine:
    """The decode thread: jobs in (`submit`), batched `sample.stream` decodes, events out (each job's `emit`)."""

    def __init__(self, models: Models, max_batch: int = 16, window_s: float = 0.01):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be >= 1")
        self.models, self.max_batch, self.window_s = models, max_batch, window_s
        self._waiting: collections.deque[Job] = collections.deque()
        self._condition = threading.Condition()
        self._closed = False
        self.batches = 0                    # decodes run, and the rows they held (for tests and the log)
        self.batch_rows: list[int] = []
        self._thread = threading.Thread(target=self._loop, name="lm.serve engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; its model must be loaded (Models.get) and each row must fit in its context."""
        if len(job.prompts) > self.max_batch:
            raise ValueError(f"{len(job.prompts)} rows > max_batch={self.max_batch}")
        with self._condition:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._waiting.append(job)
            self._condition.notify()

    def close(self, timeout: float = 10) -> None:
        with self._condition:
            self._closed = True
            for job in self._waiting:
                job.cancelled.set()
            self._condition.notify()
        self._thread.join(timeout)

    # -- the thread ------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._waiting and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return
            time.sleep(self.window_s)    # let requests sent together arrive, so they share the batch
            batch = self._take_batch()
            if batch:
                self._run_safely(batch)

    def warm_up(self, name: str, max_tokens: int) -> None:
        """Compile the decode of model `name` for every batch size the engine uses (short prompts, `max_tokens`
        each), so the first requests do not wait for compiles (call before serving)."""
        loaded = self.models.get(name)
        prompt = [loaded.tokenizer.eot_id]
        steps = decode_length(min(max_tokens, loaded.max_len - 1), 1, loaded.max_len)
        for rows in sorted({min(next_power_of_two(n), self.max_batch) for n in range(1, self.max_batch + 1)}):
            for temperatures in ([0.0] * rows, [0.0] * (rows - 1) + [1.0]):  # all greedy / not: two programs
                decode = sample.stream(loaded.model, [prompt] * rows, jax.random.key(0), steps,
                                       sample.Sampling(temperature=1.0), stop_ids=loaded.chat_stop_ids,
                                       vocab_size=loaded.tokenizer.n_vocab, temperatures=temperatures)
                next(decode)    # the prefill and the next step (dispatched before step 0 is handed over) compile
                decode.close()

    def _take_batch(self) -> list[Job]:
        """The oldest live job and every later waiting job compatible with it; the others stay queued in order."""
        with self._condition:
            waiting = [job for job in self._waiting if not job.cancelled.is_set()]
            self._waiting.clear()
            if not waiting:
                return []
            first = waiting[0]
            max_len = self.models.get(first.model).max_len
            batch, rest = [first], []
            for job in waiting[1:]:
                (batch if self._fits(batch, job, max_len) else rest).append(job)
            self._waiting.extend(rest)
            return batch

    def _fits(self, batch: list[Job], job: Job, max_len: int) -> bool:
        if job.model != batch[0].model or job.stop_ids != batch[0].stop_ids:
            return False
        top_ps = {j.top_p for j in batch + [job] if j.sampled}   # greedy rows ignore the filters
        if len(top_ps) > 1:
            return False
        if sum(len(j.prompts) for j in batch) + len(job.prompts) > self.max_batch:
            return False
        return max(j.longest for j in batch + [job]) + max(j.max_tokens for j in batch + [job]) <= max_len

    def _run_safely(self, batch: list[Job]) -> None:
        try:
            self._run(batch)
        except Exception as error:  # a failed decode fails its requests, never the server
            logging.error("decode failed: %s", traceback.format_exc())
            for job in batch:
                job.emit([("error", f"{type(error).__name__}: {error}")])

    def _run(self, batch: list[Job]) -> None:
        loaded = self.models.get(batch[0].model)
        rows = [(job, row) for job in batch for row in range(len(job.prompts))]
        prompts = [job.prompts[row] for job, row in rows]
        keys = [row_key(job.seed, row) for job, row in rows]
        temperatures = [job.temperature for job, _ in rows]
        padding = min(next_power_of_two(len(rows)), self.max_batch) - len(rows)   # dummy greedy rows, never emitted
        prompts, keys, temperatures = prompts + prompts[:1] * padding, keys + keys[:1] * padding, \
            temperatures + [0.0] * padding
        longest = max(map(len, prompts))
        steps = decode_length(max(job.max_tokens for job in batch), longest, loaded.max_len)
        top_p = next((job.top_p for job in batch if job.sampled), 1.0)
        self.batches += 1
        self.batch_rows.append(len(rows))
        logging.info("batch %d: %d request(s), %d row(s) (+%d padding), %d steps", self.batches, len(batch),
                     len(rows), padding, steps)
        counts = [0] * len(rows)
        live = [True] * len(rows)
        decode = sample.stream(loaded.model, prompts, jax.numpy.stack(keys), steps,
                               sample.Sampling(temperature=1.0, top_p=top_p), stop_ids=batch[0].stop_ids,
                               vocab_size=loaded.tokenizer.n_vocab, temperatures=temperatures)
        try:
            for step in decode:
                events = collections.defaultdict(list)
                for i, (job, row) in enumerate(rows):
                    if not live[i]:
                        continue
                    if job.cancelled.is_set() or row in job.ended_rows:
                        live[i] = False     # its consumer needs nothing more
                        continue
                    counts[i] += 1
                    events[job].append(("token", row, int(step.tokens[i]), float(step.logprobs[i])))
                    if step.stopped[i] or counts[i] >= job.max_tokens:
                        events[job].append(("finish", row, "stop" if step.stopped[i] else "length"))
                        live[i] = False
                for job, job_events in events.items():
                    job.emit(job_events)
                if not any(live):
                    return
            for job, row in (rows[i] for i in range(len(rows)) if live[i]):  # not reached: steps >= max_tokens
                job.emit([("finish", row, "length")])
        finally:
            decode.close()
