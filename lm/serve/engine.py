"""The models a server offers and the engine thread that decodes their requests together (continuous batching).

    models = Models(workdir)                # finds base/, sft/, ppo/, grpo/ runs; loads each on first use
    engine = Engine(models, max_batch=16, window_s=0.01)
    engine.submit(Job("sft", [ids] * n, max_tokens=64, temperature=0.7, top_p=1.0, seed=3, stop_ids=(end, eot),
                      emit=callback))       # callback(events) is called from the engine thread
    ...
    engine.close()

One thread runs every decode (JAX work stays on one thread; the web server's event loop never waits on the device).
It keeps one running `lm.sample.Slots` decode: a waiting job joins it at the next step when it is compatible (same
model, same top-p and stop tokens) and fits (free rows up to `max_batch`, its prompt before the decode's cursor and
its max_tokens before the context's end); its rows' token 0 comes from their prefill, then they move on with every
other row, one token per step. So a short request never waits for a long one to finish. A row ends on its own (its
stop token, its job's max_tokens, a stop string its consumer found, or its client leaving) and its slot is free for
the next job. When the oldest waiting job cannot join (another model, say), no later job joins either: the decode
drains and the next one starts with that job. A decode that starts from idle first waits `window_s` so that
requests sent together start together.

Per-row temperatures (0: greedy) and one PRNG key per row, `fold_in(key(seed), choice)`, folded with the row's own
step count: a row's tokens depend on its own request only, never on what it was decoded with or when it joined.
Each step's tokens are handed to each job's `emit` as a list of events.
"""
import collections
import dataclasses
import pathlib
import threading
import time
import traceback
from typing import Callable

import jax
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


def default_room(prompt_len: int, max_len: int) -> int:
    """Tokens a request that sets no max_tokens may get: what the context leaves after the padded prompt, or after
    the prompt itself when that is all there is."""
    return max(max_len - sample.bucket(prompt_len), 0) or max_len - prompt_len


# ------------------------------------------------------------------------------------------------ the engine


class Engine:
    """The decode thread: jobs in (`submit`), one continuously batched `sample.Slots` decode, events out (`emit`)."""

    def __init__(self, models: Models, max_batch: int = 16, window_s: float = 0.01):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be >= 1")
        self.models, self.max_batch, self.window_s = models, max_batch, window_s
        self._waiting: collections.deque[Job] = collections.deque()
        self._condition = threading.Condition()
        self._closed = False
        self.batches = 0                    # decodes started from idle, and the most rows each held at once
        self.batch_rows: list[int] = []
        self._decode: sample.Slots | None = None
        self._decode_model: str | None = None
        self._owners: list = []             # per slot: [job, row, tokens so far] or None when free
        self._joining: Job | None = None    # the job being prefilled (it fails too if that fails)
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

    def warm_up(self, name: str, max_tokens: int) -> None:
        """Compile the decode of model `name` (short prompts) for every number of rows the engine uses, started
        together and joining one by one, so that the first requests do not wait for compiles (call before serving)."""
        loaded = self.models.get(name)
        prompt, key = [loaded.tokenizer.eot_id], jax.random.key(0)
        steps = min(max_tokens, loaded.max_len - sample.bucket(1))
        sizes = sorted({min(sample.next_power_of_two(n), self.max_batch) for n in range(1, self.max_batch + 1)})
        for together in (True, False):
            for rows in sizes:
                decode = self._new_decode(loaded, loaded.chat_stop_ids, 1.0)
                for n in ([rows] if together else [1] * rows):
                    decode.add([prompt] * n, key, [0.0] * n, steps)
                    decode.fetch(decode.step())

    # -- the thread ------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._waiting and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return
            time.sleep(self.window_s)    # let requests sent together arrive, so they start together
            try:
                self._run()
            except Exception as error:  # a failed decode fails its requests, never the server
                logging.error("decode failed: %s", traceback.format_exc())
                for job in {owner[0] for owner in self._owners if owner} | {self._joining} - {None}:
                    job.emit([("error", f"{type(error).__name__}: {error}")])
                self._decode, self._owners, self._joining = None, [], None

    def _run(self) -> None:
        """One decode from idle to idle: admit, dispatch a step, hand out the previous one's tokens, again."""
        pending = None
        while True:
            self._admit()
            if not any(self._owners):
                break
            dispatched = (self._decode.step(), list(self._owners))
            if pending:
                self._hand_out(*pending)     # while the device works on the step just dispatched
            pending = dispatched
        if pending:
            self._hand_out(*pending)
        self._decode = None

    def _admit(self) -> None:
        """Every waiting job that can join the running decode now, oldest first, up to the first that cannot."""
        while True:
            with self._condition:
                while self._waiting and self._waiting[0].cancelled.is_set():
                    self._waiting.popleft()
                if not self._waiting or self._closed:
                    return
                job = self._waiting[0]
                if not any(self._owners):   # idle: a new decode for this job's model, stop ids and top-p
                    loaded = self.models.get(job.model)
                    self._decode = self._new_decode(loaded, job.stop_ids, job.top_p if job.sampled else 1.0)
                    self._decode_model, self._owners = job.model, []
                    self.batches += 1
                    self.batch_rows.append(0)
                elif not self._can_join(job):
                    return
                self._joining = self._waiting.popleft()
            self._join(job)
            self._joining = None

    def _can_join(self, job: Job) -> bool:
        """Same model and stop ids as the running decode, its top-p if the job samples (greedy rows ignore the
        filters), and room for it now."""
        decode = self._decode
        return job.model == self._decode_model and job.stop_ids == decode.stop_ids and \
            (not job.sampled or job.top_p == decode.sampling.top_p) and \
            decode.can_add(len(job.prompts), job.longest, job.max_tokens)

    def _new_decode(self, loaded: LoadedModel, stop_ids: tuple, top_p: float) -> sample.Slots:
        return sample.Slots(loaded.model, self.max_batch, sample.Sampling(temperature=1.0, top_p=top_p),
                            stop_ids=stop_ids, vocab_size=loaded.tokenizer.n_vocab)

    def _join(self, job: Job) -> None:
        """Prefill the job's rows into free slots and hand out their token 0."""
        n = len(job.prompts)
        keys = jax.numpy.stack([row_key(job.seed, row) for row in range(n)])
        slots, first = self._decode.add(job.prompts, keys, [job.temperature] * n, job.max_tokens)
        self._owners += [None] * (self._decode.size - len(self._owners))
        for slot, row in zip(slots, range(n)):
            self._owners[slot] = [job, row, 0]
        self.batch_rows[-1] = max(self.batch_rows[-1], sum(map(bool, self._owners)))
        logging.info("decode %d: a job of %d row(s) joins at column %d; %d of %d slots busy", self.batches, n,
                     self._decode.index, sum(map(bool, self._owners)), self._decode.size)
        self._hand_out(first, [self._owners[slot] for slot in slots], slots)

    def _hand_out(self, emitted, owners, slots=None) -> None:
        """Each live row's token of one step to its job (rows that left since the step was dispatched are skipped)."""
        step = emitted if isinstance(emitted, sample.Step) else self._decode.fetch(emitted)
        slots = range(len(owners)) if slots is None else slots
        events = collections.defaultdict(list)
        for i, (slot, owner) in enumerate(zip(slots, owners)):
            if owner is None or slot >= len(self._owners) or self._owners[slot] is not owner:
                continue    # a free slot, or its row left (or its decode ended) after the step was dispatched
            job, row, count = owner
            if job.cancelled.is_set() or row in job.ended_rows:
                self._free(slot)    # its consumer needs nothing more
                continue
            owner[2] = count = count + 1
            events[job].append(("token", row, int(step.tokens[i]), float(step.logprobs[i])))
            if step.stopped[i] or count >= job.max_tokens:
                events[job].append(("finish", row, "stop" if step.stopped[i] else "length"))
                self._free(slot)
        for job, job_events in events.items():
            job.emit(job_events)

    def _free(self, slot: int) -> None:
        self._owners[slot] = None
        self._decode.release(slot)
