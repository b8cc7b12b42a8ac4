"""Text generation with a KV cache: greedy, temperature, top-k and top-p sampling, shared by the CLI, chat and RL.

    model, tok, config, meta = lm.checkpoint.load_run(workdir)
    outs = generate(model, tok, ["def ", "The list"], jax.random.key(0), Sampling(temperature=0.8, top_p=0.95))
    outs[0].text, outs[0].tokens, outs[0].logprobs, outs[0].finish_reason

One jitted program does a whole batch: the prompts are left-padded to a common length (padding takes position -1,
which the model's attention ignores), prefilled in one pass (the LM head only at the last position; a prompt
that repeats, as RL's G samples of one problem, is prefilled once and its KV cache copied), then a
`jax.lax.while_loop` feeds one token per step until every row has stopped or `max_new_tokens` is reached. It is
compiled per model, batch size, padded prompt length (a power of two), max_new_tokens and filters; the temperature
is an input (one per row if wanted), so changing it does not recompile.

Streaming (chat, serve): `stream(...)` takes generate_ids' arguments and yields one `Step` per generated position,
every row's token and log-prob, as soon as it is computed: the prefill is one jitted call, each further token one
jitted step for the whole batch, driven from Python. Its pieces are generate_ids' own, so the tokens are the same:

    for step in stream(model, [ids], key, 64, Sampling(temperature=0.7), stop_ids=[end_id]):
        print(decoder.feed(int(step.tokens[0])), end="", flush=True)

Row b samples with its own key (`fold_in(key, b)`, or the b-th of a batch of keys) folded with the step, so a row's
text does not depend on the other rows of the batch. Log-probabilities are the model's own (temperature 1,
unfiltered), from `lm.model.token_logprobs`, the function the trainers differentiate: what RL's ratios need.
A model whose parameters are spread over a mesh runs there, rows split over the mesh's batch axes.

CLI (text on stdout, logs on stderr):
    python -m lm.sample --workdir=runs/tiny --prompt="The list" [--temperature=0.8 --top_k=40 --top_p=0.95
        --num_samples=2 --seed=0 --max_new_tokens=48 --stop=... --show_probs]
Greedy decoding (--temperature=0) gives one sample per prompt: every sample would be the same.
"""
import contextlib
import dataclasses
import functools
import sys
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from lm import mesh as lm_mesh
from lm import model as lm_model
from lm.model import reductions

PROMPT_BUCKET = 16  # the shortest padded prompt length; longer ones round up to a power of two (few compiles)
NO_TOKEN = -1       # generated-token value after a row has stopped
# Stop-table entries besides token ids, and what the window of recent tokens holds before any was generated.
ANY, NEVER, NOT_YET = -1, -2, -3


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_config(cls, sample_config, **overrides) -> "Sampling":
        """From `config.sample` (temperature, top_k, top_p); overrides that are None are ignored."""
        values = dict(temperature=float(sample_config.get("temperature", 1.0)),
                      top_k=int(sample_config.get("top_k", 0)), top_p=float(sample_config.get("top_p", 1.0)))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# ------------------------------------------------------------------------------------------------ choosing a token


def top_k_filter(logits, k: int):
    """Logits [..., V] with all but the k largest set to -inf (ties with the k-th largest are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits, p: float):
    """Logits [..., V] with everything outside the nucleus set to -inf.

    The nucleus is the smallest set of most probable tokens whose probabilities sum to at least p: in descending
    order, a token is kept when the probability mass before it is still below p (so the most probable always is).
    """
    if p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = reductions.softmax(sorted_logits)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    keep = jnp.zeros_like(keep_sorted)
    keep = jnp.put_along_axis(keep, order, keep_sorted, axis=-1, inplace=False)
    return jnp.where(keep, logits, -jnp.inf)


def sampling_logits(logits, sampling: Sampling):
    """The logits actually sampled from: divided by the temperature, then top-k, then top-p (HF's order)."""
    logits = logits.astype(jnp.float32) / sampling.temperature
    return top_p_filter(top_k_filter(logits, sampling.top_k), sampling.top_p)


def choose(logits, keys, sampling: Sampling, greedy_rows=None):
    """Next tokens int32 [B] from logits [B, V]; keys [B] (one per row).

    greedy_rows bool [B]: rows that take the argmax although `sampling` samples (temperature 0 in a mixed batch).
    """
    best = first_argmax(logits)
    if sampling.greedy:
        return best
    drawn = inverse_cdf_draw(keys, sampling_logits(logits, sampling))
    return drawn if greedy_rows is None else jnp.where(greedy_rows, best, drawn)


def first_argmax(x):
    """int32 [B]: jnp.argmax(x [B, V], axis=-1) (the first maximum) for x without NaNs, as two plain reductions.
    XLA's CPU backend runs argmax's (value, index) reduction unvectorised: 0.3 ms for 32 x 2,048, more than the
    rest of a decode step's sampling (a max and a min of indices: ~10x less)."""
    top = jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x == top, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]), axis=-1)


CDF_BLOCK = 64  # vocabulary entries per block of the two-level cumulative sum in inverse_cdf_draw


def inverse_cdf_draw(keys, logits):
    """int32 [B]: one token per row drawn from softmax(logits [B, V]) with one uniform per row (keys [B]).

    The same distribution as jax.random.categorical, whose Gumbel trick draws V uniforms per row: on CPU those
    random bits cost more than the whole decode step of a small model. The token is the first whose cumulative
    probability passes u x total; tokens of probability 0 (filtered, -inf) are never drawn: a flat stretch of a
    cumulative sum is never the first to pass, and the rounding case where u x total is not passed takes the last
    entry of positive probability of the stretch searched, not a trailing filtered one.

    The search is two-level: the block (CDF_BLOCK entries) whose cumulative mass passes, then the entry inside it.
    XLA's CPU backend runs a cumsum over V as a reduce-window (0.4 ms a step for 32 x 2,048); over V / 64 block
    sums and one block's 64 entries it costs ~10x less."""
    uniforms = jax.vmap(lambda key: jax.random.uniform(key, ()))(keys)
    probs = reductions.softmax(logits)
    B, V = probs.shape
    block = min(CDF_BLOCK, V)
    blocks = -(-V // block)
    probs = jnp.pad(probs, ((0, 0), (0, blocks * block - V))).reshape(B, blocks, block)
    block_mass = jnp.cumsum(jnp.sum(probs, axis=-1), axis=-1)           # [B, blocks]
    threshold = uniforms * block_mass[:, -1]
    chosen = _first_passing(block_mass, threshold, jnp.zeros_like(threshold))  # [B]
    rows = jnp.arange(B)
    before = jnp.where(chosen > 0, block_mass[rows, jnp.maximum(chosen - 1, 0)], 0.0)
    inside = before[:, None] + jnp.cumsum(probs[rows, chosen], axis=-1)  # [B, block]
    return (chosen * block + _first_passing(inside, threshold, before)).astype(jnp.int32)


def _first_passing(cumulative, threshold, start):
    """The first index whose cumulative value [B, n] (from `start` [B] on) passes threshold [B]; if none does
    (rounding), the last index where the cumulative value still grows (the last of positive probability)."""
    passed = jnp.sum(cumulative <= threshold[:, None], axis=-1)
    grows = jnp.concatenate([cumulative[:, :1] > start[:, None], cumulative[:, 1:] > cumulative[:, :-1]], axis=-1)
    last = jnp.max(jnp.where(grows, jnp.arange(cumulative.shape[-1]), 0), axis=-1)
    return jnp.minimum(passed, last)


# ------------------------------------------------------------------------------------------------ the decode program
#
# One decode is: `_start` (prefill the prompts into a fresh KV cache, choose token 0) and then `_advance` once per
# further token (feed the last token, choose the next). `generate_ids` runs both inside one jitted while_loop;
# `stream` jits them apart and drives the steps from Python. The choosing (`_choose_next`: filters, key folding,
# stop matching, log-probs) exists once, so both give the same tokens for the same key.


@dataclasses.dataclass
class TokenOutput:
    """Generated ids, numpy, one row per prompt. Entries after a row stopped are NO_TOKEN / 0."""
    tokens: np.ndarray          # int32 [B, max_new_tokens]
    logprobs: np.ndarray        # float32 [B, max_new_tokens]: log p(token | prefix) under the model
    lengths: np.ndarray         # int32 [B]: tokens generated, the stop token included
    stopped: np.ndarray         # bool [B]: ended by a stop token or sequence (else by max_new_tokens)
    top_ids: np.ndarray | None = None    # int32 [B, max_new_tokens, n]: the model's most probable next tokens
    top_probs: np.ndarray | None = None  # float32 [B, max_new_tokens, n]
    values: np.ndarray | None = None     # float32 [B, max_new_tokens]: with values=True, the model's scalar head at
    #                                      the state each token was chosen from (PPO's value of its prefix); 0 after


@dataclasses.dataclass
class Step:
    """What every row generated at step `index` of a `stream` (numpy)."""
    index: int
    tokens: np.ndarray          # int32 [B]: the token chosen; NO_TOKEN for a row that had already stopped
    logprobs: np.ndarray        # float32 [B]: log p(token | prefix) under the model; 0 where no token
    stopped: np.ndarray         # bool [B]: this token ended the row (a stop token, or the end of a stop sequence)
    top_ids: np.ndarray | None = None    # int32 [B, n]
    top_probs: np.ndarray | None = None  # float32 [B, n]

    @property
    def live(self) -> np.ndarray:
        """bool [B]: the row generated a token at this step."""
        return self.tokens != NO_TOKEN


@dataclasses.dataclass(frozen=True)
class _Request:
    """A checked decode request: the device inputs and the static (compiled-in) settings."""
    tokens: np.ndarray          # int32 [B, P] left-padded prompts
    positions: np.ndarray       # int32 [B, P]
    row_keys: jax.Array         # [B] PRNG keys
    stops: np.ndarray           # int32 [S, W] stop table
    temperature: jax.Array      # float32 [B]: divides the logits (1 for greedy rows)
    greedy_rows: jax.Array      # bool [B]: rows that take the argmax
    max_new_tokens: int
    static: dict                # graphdef, sampling (temperature 0 or 1: greedy or not), vocab_size, top_candidates
    mesh: object
    sources: tuple | None       # (distinct rows int32 [U], each row's distinct row int32 [B]) when prompts repeat


def _request(model, prompts, key, max_new_tokens, sampling, stop_ids, stop_sequences, vocab_size, top_candidates,
             mesh, temperatures) -> tuple[_Request, object]:
    """(request, parameter state): the arguments of generate_ids / stream checked and turned into arrays."""
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or min(map(len, prompts)) == 0:
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    spec = model.spec
    longest = max(map(len, prompts))
    if longest + max_new_tokens > spec.max_len:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} > "
                         f"config.model.max_len={spec.max_len}")
    # the bucket never pads past the context: GPT-2's learned positions end there (a 70-token prompt of a 96 context)
    tokens, positions = left_pad(prompts, min(bucket(longest), spec.max_len))
    temperatures = np.full(len(prompts), sampling.temperature, np.float32) if temperatures is None \
        else np.asarray(temperatures, np.float32).reshape(-1)
    if temperatures.shape != (len(prompts),) or (temperatures < 0).any():
        raise ValueError(f"temperatures {temperatures.tolist()}: need one temperature >= 0 per prompt")
    greedy_rows = temperatures == 0
    graphdef, state = nnx.split(model)
    # The temperatures are traced (changing them does not recompile); the filters and all-greedy-or-not are static.
    static = dict(graphdef=graphdef, vocab_size=vocab_size or spec.vocab_size, top_candidates=top_candidates,
                  sampling=dataclasses.replace(sampling, temperature=0.0 if greedy_rows.all() else 1.0))
    mesh = mesh or _mesh_of(state)
    request = _Request(tokens, positions, _row_keys(key, len(prompts)), _stop_table(stop_ids, stop_sequences),
                       jnp.asarray(np.where(greedy_rows, 1.0, temperatures)), jnp.asarray(greedy_rows),
                       max_new_tokens, static, mesh, None if mesh is not None else repeated_prompts(prompts))
    return request, state


def repeated_prompts(prompts):
    """(distinct rows, source of every row) as int32 arrays when some prompts repeat (RL's G samples of a problem),
    else None: the prefill then runs once per distinct prompt and its KV cache is copied to the repeats."""
    first = {}
    source = np.asarray([first.setdefault(tuple(p), len(first)) for p in prompts], np.int32)
    if len(first) == len(prompts):
        return None
    return np.unique(source, return_index=True)[1].astype(np.int32), source


def generate_ids(model, prompts, key, max_new_tokens: int, sampling: Sampling = Sampling(), stop_ids=(),
                 stop_sequences=(), vocab_size: int | None = None, top_candidates: int = 0,
                 mesh=None, temperatures=None, values: bool = False) -> TokenOutput:
    """Generates up to `max_new_tokens` after each prompt (lists of token ids, any lengths).

    key: one PRNG key (row b uses fold_in(key, b)) or a batch of keys, one per prompt.
    stop_ids: tokens that end a row (e.g. end-of-text); stop_sequences: token-id sequences that end a row.
    vocab_size: ids >= this are never chosen (a model vocabulary padded beyond the tokenizer's).
    top_candidates: also return the n most probable next tokens of each step (for display).
    mesh: the mesh to run on, rows split over its batch axes (default: the one the parameters live on, if any).
    temperatures: one per prompt instead of sampling.temperature (0: that row is greedy); the filters are shared.
    values: also return the model's scalar head (a TransformerWithScalarHead: PPO's policy + value) at the final
    hidden state each token was chosen from, which the decode computes anyway: PPO's scoring then needs no pass of
    the policy's trunk.
    """
    if values and not hasattr(model, "scalar_head"):
        raise ValueError(f"generate_ids(values=True) needs a model with a scalar head, not {type(model).__name__}")
    request, state = _request(model, prompts, key, max_new_tokens, sampling, stop_ids, stop_sequences, vocab_size,
                              top_candidates, mesh, temperatures)
    with _on_mesh(request.mesh):
        tokens, positions = _place_rows(request)
        out = _decode(state, tokens, positions, request.row_keys, request.stops, request.temperature,
                      request.greedy_rows, request.sources, max_new_tokens=max_new_tokens, mesh=request.mesh,
                      values=values, **request.static)
        out = jax.device_get(out)
    return TokenOutput(**{name: np.asarray(value) for name, value in out.items()})


def stream(model, prompts, key, max_new_tokens: int, sampling: Sampling = Sampling(), stop_ids=(),
           stop_sequences=(), vocab_size: int | None = None, top_candidates: int = 0, mesh=None,
           temperatures=None) -> Iterator[Step]:
    """`generate_ids` one step at a time: yields a `Step` (every row's token of that step) as soon as it exists.

    The arguments, and the tokens and log-probs, are generate_ids' (the same program pieces with the same keys).
    The prefill is one jitted call and each further token one jitted step for the whole batch (the weights are
    read once per step for all rows; the KV cache is donated, so it is updated in place). The next step is
    dispatched before the current one is fetched, so the device works while the caller handles a token. The
    iteration ends when every row has stopped or after max_new_tokens steps; a caller may stop it earlier.
    """
    request, state = _request(model, prompts, key, max_new_tokens, sampling, stop_ids, stop_sequences, vocab_size,
                              top_candidates, mesh, temperatures)
    args = (request.row_keys, request.stops, request.temperature, request.greedy_rows)
    static = dict(mesh=request.mesh, **request.static)
    finished = np.zeros(len(request.tokens), bool)
    with _on_mesh(request.mesh):
        tokens, positions = _place_rows(request)
        carry, emitted = _stream_start(state, tokens, positions, *args, request.sources,
                                       cache_len=tokens.shape[1] + max_new_tokens, **static)
        for index in range(max_new_tokens):
            following = None
            if index + 1 < max_new_tokens:  # queue the next step before waiting for this one
                carry, following = _stream_step(state, carry, *args, **static)
            step = Step(index, **{name: np.asarray(value) for name, value in jax.device_get(emitted).items()})
            finished |= step.stopped | ~step.live
            yield step
            if finished.all():
                return
            emitted = following


def _on_mesh(mesh):
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def _place_rows(request: _Request):
    """The prompt arrays, rows split over the mesh's batch axes when there is a mesh (call under `_on_mesh`)."""
    if request.mesh is None:
        return request.tokens, request.positions
    rows = lm_mesh.named_sharding(request.mesh, ("batch", None), request.tokens.shape)
    return jax.device_put((request.tokens, request.positions), rows)


def _mesh_of(state):
    """The mesh the parameters live on, if they are spread over more than one device."""
    sharding = getattr(jax.tree.leaves(state)[0], "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    return mesh if mesh is not None and mesh.size > 1 else None


def bucket(length: int) -> int:
    """The padded length of a batch whose longest row has `length` tokens: a power of two, at least PROMPT_BUCKET."""
    return max(PROMPT_BUCKET, next_power_of_two(length))


def left_pad(prompts, length: int):
    """(tokens, positions), int32 [B, length]: prompts right-aligned; padding has token 0 and position -1."""
    tokens = np.zeros((len(prompts), length), np.int32)
    positions = np.full((len(prompts), length), -1, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt):] = prompt
        positions[row, length - len(prompt):] = np.arange(len(prompt))
    return tokens, positions


@functools.partial(jax.jit, static_argnames="batch")
def _fold_in_rows(key, *, batch):
    """[batch] keys fold_in(key, b). Jitted: the eager vmap took ~4 ms of Python per call, per RL rollout."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(batch))


def _row_keys(key, batch):
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.shape == ():
        return _fold_in_rows(key, batch=batch)
    if key.shape != (batch,):
        raise ValueError(f"key batch of shape {key.shape}: need one key or {batch} keys")
    return key


def _stop_table(stop_ids, stop_sequences):
    """int32 [S, W]: stop sequences right-aligned, ANY where shorter (matches anything).

    S and W are rounded up to multiples of 4 with rows that never match, so most stop settings share one program.
    """
    sequences = [[int(i)] for i in stop_ids] + [list(map(int, s)) for s in stop_sequences if len(s)]
    width = -(-max([1] + [len(s) for s in sequences]) // 4) * 4
    table = np.full((-(-max(1, len(sequences)) // 4) * 4, width), NEVER, np.int32)
    for row, seq in enumerate(sequences):
        table[row, :width - len(seq)] = ANY
        table[row, width - len(seq):] = seq
    return table


def _last_hidden(model, tokens, positions, cache):
    """(final hidden state [B, d] at the last position of every row, cache): the prefill runs the LM head, its
    largest matmul for long prompts, on one position only. Left padding puts every row's last prompt token there."""
    hidden, cache = model.hidden(tokens, positions=positions, cache=cache)
    return hidden[:, -1], cache


def _choose_next(step, logits, done, window, row_keys, stops, temperature, greedy_rows, *, sampling, vocab_size,
                 top_candidates):
    """Every row's token of `step` from logits [B, V]: (token fed back, what the step emits, done, window).

    Rows that are already `done` emit NO_TOKEN / 0 (their token is still fed back: the model needs a valid id).
    """
    logits = logits.at[:, vocab_size:].set(-jnp.inf) if vocab_size < logits.shape[-1] else logits
    # step: one for all rows, or one per row (Slots: rows that joined later count their own steps)
    keys = jax.vmap(jax.random.fold_in)(row_keys, jnp.broadcast_to(step, row_keys.shape))
    token = choose(logits / temperature[:, None], keys, sampling, greedy_rows)
    window = jnp.concatenate([window[:, 1:], token[:, None]], axis=1)
    hit = ((window[:, None, :] == stops[None]) | (stops[None] == ANY)).all(-1).any(-1)
    emitted = dict(tokens=jnp.where(done, NO_TOKEN, token),
                   logprobs=jnp.where(done, 0.0, lm_model.token_logprobs(logits, token)), stopped=hit & ~done)
    if top_candidates:
        top_ids = jax.lax.top_k(logits, top_candidates)[1]
        every = jnp.broadcast_to(logits[:, None], (*top_ids.shape, logits.shape[-1]))
        emitted.update(top_ids=top_ids, top_probs=jnp.exp(lm_model.token_logprobs(every, top_ids)))
    return token, emitted, done | hit, window


def _start(model, tokens, positions, row_keys, stops, temperature, greedy_rows, sources=None, *, cache_len, mesh,
           values=False, **choice):
    """Prefill and choose token 0: (carry for `_advance`, what step 0 emits). sources: `repeated_prompts`;
    values: also emit the scalar head at the state token 0 was chosen from."""
    B = tokens.shape[0]
    if sources is None:
        cache = _place_cache(model.init_cache(B, cache_len), mesh)
        hidden, cache = _last_hidden(model, tokens, positions, cache)
    else:  # each distinct prompt once, its state and cache rows copied to every row that repeats it
        distinct, source = sources
        hidden, cache = _last_hidden(model, tokens[distinct], positions[distinct],
                                     model.init_cache(distinct.shape[0], cache_len))
        hidden, cache = hidden[source], lm_model.take_cache_rows(cache, source)
    window = jnp.full((B, stops.shape[1]), NOT_YET, jnp.int32)  # the last generated tokens, for stop matching
    token, emitted, done, window = _choose_next(0, model.logits(hidden), jnp.zeros((B,), bool), window, row_keys,
                                                stops, temperature, greedy_rows, **choice)
    if values:
        emitted["values"] = model.scalar_head(hidden)
    carry = dict(step=jnp.int32(1), token=token, position=positions[:, -1] + 1, cache=cache, done=done,
                 window=window)
    return carry, emitted


def _advance(model, carry, row_keys, stops, temperature, greedy_rows, *, mesh, values=False, **choice):
    """Feed the last token, choose the next: (carry, what step carry["step"] emits)."""
    hidden, cache = model.hidden(carry["token"][:, None], positions=carry["position"][:, None], cache=carry["cache"])
    hidden = hidden[:, 0]
    token, emitted, done, window = _choose_next(carry["step"], model.logits(hidden), carry["done"], carry["window"],
                                                row_keys, stops, temperature, greedy_rows, **choice)
    if values:
        emitted["values"] = jnp.where(carry["done"], 0.0, model.scalar_head(hidden))
    carry = dict(step=carry["step"] + 1, token=token, position=carry["position"] + 1,
                 cache=_place_cache(cache, mesh), done=done, window=window)
    return carry, emitted


_CHOICE = ("graphdef", "sampling", "vocab_size", "top_candidates", "mesh")


@functools.partial(jax.jit, static_argnames=_CHOICE + ("max_new_tokens", "values"))
def _decode(state, tokens, positions, row_keys, stops, temperature, greedy_rows, sources, *, graphdef,
            max_new_tokens, mesh, **choice):
    """The whole decode in one program: `_start`, then a while_loop of `_advance`; the TokenOutput fields."""
    model = nnx.merge(graphdef, state)
    rows = (row_keys, stops, temperature, greedy_rows)
    carry, emitted = _start(model, tokens, positions, *rows, sources, cache_len=tokens.shape[1] + max_new_tokens,
                            mesh=mesh, **choice)
    out = {name: jnp.zeros((tokens.shape[0], max_new_tokens, *value.shape[1:]), value.dtype)
           for name, value in emitted.items()}
    out["tokens"] = jnp.full_like(out["tokens"], NO_TOKEN)

    def record(out, step, emitted):
        return {name: out[name].at[:, step].set(value) for name, value in emitted.items()}

    def cond(loop):
        carry, _ = loop
        return (carry["step"] < max_new_tokens) & ~carry["done"].all()

    def body(loop):
        carry, out = loop
        step = carry["step"]
        carry, emitted = _advance(model, carry, *rows, mesh=mesh, **choice)
        return carry, record(out, step, emitted)

    _, out = jax.lax.while_loop(cond, body, (carry, record(out, 0, emitted)))
    out["lengths"] = (out["tokens"] != NO_TOKEN).sum(axis=1).astype(jnp.int32)
    out["stopped"] = out["stopped"].any(axis=1)
    return out


@functools.partial(jax.jit, static_argnames=_CHOICE + ("cache_len",))
def _stream_start(state, tokens, positions, row_keys, stops, temperature, greedy_rows, sources=None, *, graphdef,
                  **static):
    return _start(nnx.merge(graphdef, state), tokens, positions, row_keys, stops, temperature, greedy_rows, sources,
                  **static)


@functools.partial(jax.jit, static_argnames=_CHOICE, donate_argnames="carry")
def _stream_step(state, carry, row_keys, stops, temperature, greedy_rows, *, graphdef, **static):
    return _advance(nnx.merge(graphdef, state), carry, row_keys, stops, temperature, greedy_rows, **static)


def _map_kv(fn, kv, *more):
    """fn(buffer, rows axis, columns axis, *more's buffers) over a cache's k (or v): one buffer per layer
    [B, K, S, D] or one stacked [layers, B, K, S, D] (lm.model.Transformer.init_cache)."""
    return jax.tree.map(lambda x, *m: fn(x, x.ndim - 4, x.ndim - 2, *m), kv, *more)


def _place_cache(cache, mesh):
    """Rows of the KV cache over the batch axes and kv heads over `tensor` (as lm.model.cache_shardings says)."""
    if mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, lm_model.cache_shardings(cache, mesh))


# ------------------------------------------------------------------------------------------------ continuous batching


class Slots:
    """A decode whose rows (slots) are filled while it runs: continuous batching, for lm.serve.

        slots = Slots(model, max_rows=16, sampling=Sampling(top_p=0.9), stop_ids=[end_id], vocab_size=tok.n_vocab)
        rows, first = slots.add([ids], keys, temperatures=[0.7], max_new_tokens=64)   # token 0 of the new rows
        emitted = slots.step()          # dispatched, not waited for: every slot's next token (fetch(emitted))
        slots.release(rows[0])          # its slot is free for the next add

    One KV cache; every slot writes at the same cursor. `add` prefills new prompts (each into a free slot) so that
    they end at the cursor (a prompt must not be longer than the columns before it), the rest of their row masked
    out, and chooses their token 0; then `step` moves every slot on. The cache grows (rows kept) to a power of two of
    rows, up to max_rows, and of columns, up to the model's context, as the rows added need (few compiles, and
    attention reads no more columns than the rows need). A row's key folds its own step count, so its tokens are
    the ones `stream` gives it alone, whatever else is decoding.
    Temperatures are per row (0: greedy); the filters (top-k, top-p) and stop ids are the decode's.
    """

    def __init__(self, model, max_rows: int, sampling: Sampling = Sampling(), stop_ids=(), vocab_size=None):
        self.model, self.max_rows, self.max_len = model, max_rows, model.spec.max_len
        graphdef, self.state = nnx.split(model)
        self.stop_ids, self.stops = tuple(stop_ids), _stop_table(stop_ids, ())
        # one program for greedy and sampled rows: the greedy ones take the argmax (greedy_rows)
        self.static = dict(graphdef=graphdef, sampling=dataclasses.replace(sampling, temperature=1.0),
                           vocab_size=vocab_size or model.spec.vocab_size, top_candidates=0, mesh=None)
        self.sampling = sampling
        self.greedy = np.zeros(0, bool)  # per slot: its row is greedy (a step of greedy rows only skips sampling)
        self.busy = np.zeros(0, bool)
        self.carry = self.rows = None   # the decode's state and its rows' (key data, temperature, greedy)
        self.index = 0      # the cursor: cache columns written so far

    def can_add(self, rows: int, longest: int, max_new_tokens: int) -> bool:
        """Whether `rows` prompts (the longest `longest` tokens) fit now: free or growable slots, the prompts before
        the cursor and max_new_tokens after it, in the context. An idle decode takes anything that fits the context."""
        if not self.busy.any():
            return rows <= self.max_rows and longest + max_new_tokens <= self.max_len
        free = (~self.busy).sum() + self.max_rows - len(self.busy)
        return rows <= free and longest <= self.index and self.index + max_new_tokens <= self.max_len

    def add(self, prompts, keys, temperatures, max_new_tokens: int) -> tuple[list[int], Step]:
        """(the slots the prompts took, their token 0 as a Step over those rows); call can_add first."""
        n = len(prompts)
        width = next_power_of_two(n)                  # few programs: pad the new rows to a power of two
        pad = lambda rows: list(rows) + [rows[0]] * (width - n)  # noqa: E731
        keys = _row_keys(keys, n)[jnp.asarray(pad(range(n)))]
        request, _ = _request(self.model, pad(prompts), keys, max_new_tokens,
                              self.sampling, self.stop_ids, (), self.static["vocab_size"], 0, None, pad(temperatures))
        length = request.tokens.shape[1]
        if not self.busy.any():   # idle: start afresh, the cursor after the padded prompt where the context allows
            self.busy, self.greedy, self.carry = np.zeros(0, bool), np.zeros(0, bool), None
            self.index = min(length, self.max_len - max_new_tokens)
        self._make_room(n, min(next_power_of_two(self.index + max_new_tokens), self.max_len))
        slots = [int(i) for i in np.flatnonzero(~self.busy)[:n]]
        self.busy[slots] = True
        self.greedy[slots] = np.asarray(temperatures) == 0
        row_data = (jax.random.key_data(request.row_keys), request.temperature, request.greedy_rows)
        new, emitted = _stream_start(self.state, request.tokens, request.positions, request.row_keys, self.stops,
                                     request.temperature, request.greedy_rows, cache_len=length, **self.static)
        self.carry, self.rows = _splice(self.carry, self.rows, new, row_data, jnp.asarray(pad(slots)), self.index)
        first = jax.device_get(emitted)
        return slots, Step(0, **{name: np.asarray(value)[:n] for name, value in first.items()})

    def step(self) -> dict:
        """Dispatch every slot's next token; returns the device arrays of what it emits (`fetch` waits for them)."""
        if self.index >= self.columns:
            raise ValueError(f"the decode's cursor is at the end of its {self.columns} cache columns")
        key_data, temperature, greedy_rows = self.rows
        static = self.static
        if self.greedy[self.busy].all():
            static = dict(static, sampling=dataclasses.replace(static["sampling"], temperature=0.0))
        self.carry, emitted = _stream_step(self.state, self.carry, jax.random.wrap_key_data(key_data), self.stops,
                                           temperature, greedy_rows, **static)
        self.index += 1
        return emitted

    @staticmethod
    def fetch(emitted) -> Step:
        return Step(-1, **{name: np.asarray(value) for name, value in jax.device_get(emitted).items()})

    def release(self, slot: int) -> None:
        self.busy[slot] = False

    @property
    def size(self) -> int:
        return len(self.busy)

    def _make_room(self, n: int, columns: int) -> None:
        """Grow the cache (every row kept) to leave n slots free (a power of two of rows) and hold `columns`."""
        rows = len(self.busy) if (~self.busy).sum() >= n else min(next_power_of_two(int(self.busy.sum()) + n),
                                                                    self.max_rows)
        if self.carry is None:
            self.carry, self.rows = _idle(self.model, rows, columns, self.stops.shape[1], self.index)
        elif rows > len(self.busy) or columns > self.columns:
            self.carry, self.rows = _grow(self.carry, self.rows, rows=rows, columns=max(columns, self.columns))
        self.busy = np.concatenate([self.busy, np.zeros(rows - len(self.busy), bool)])
        self.greedy = np.concatenate([self.greedy, np.ones(rows - len(self.greedy), bool)])

    @property
    def columns(self) -> int:
        return self.carry["cache"]["pos"].shape[1]


def _idle(model, rows, cache_len, window, index):
    """The carry of `rows` free slots (done, nothing cached) with the cursor at `index`, and their row arrays."""
    cache = dict(model.init_cache(rows, cache_len), index=jnp.int32(index))
    carry = dict(step=jnp.zeros(rows, jnp.int32), token=jnp.zeros(rows, jnp.int32),
                 position=jnp.zeros(rows, jnp.int32), cache=cache, done=jnp.ones(rows, bool),
                 window=jnp.full((rows, window), NOT_YET, jnp.int32))
    key_data = jax.random.key_data(_row_keys(jax.random.key(0), rows))
    return carry, (key_data, jnp.ones(rows, jnp.float32), jnp.ones(rows, bool))


@functools.partial(jax.jit, static_argnames=("rows", "columns"))
def _grow(carry, row_arrays, *, rows, columns):
    """The carry and row arrays with free slots appended up to `rows`, and cache columns up to `columns` (empty:
    position -1). The cache's rows axis is 1 (k, v) or 0 (pos), every other array's 0."""
    def pad(x, axis=0, value=0, column_axis=None):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, rows - x.shape[axis])
        if column_axis is not None:
            widths[column_axis] = (0, columns - x.shape[column_axis])
        return jnp.pad(x, widths, constant_values=value)

    def grow_kv(x, rows_axis, columns_axis):
        return pad(x, rows_axis, column_axis=columns_axis)
    cache = carry["cache"]
    grown = dict(carry, step=pad(carry["step"]), token=pad(carry["token"]), position=pad(carry["position"]),
                 done=pad(carry["done"], value=True), window=pad(carry["window"], value=NOT_YET),
                 cache=dict(cache, k=_map_kv(grow_kv, cache["k"]), v=_map_kv(grow_kv, cache["v"]),
                            pos=pad(cache["pos"], value=-1, column_axis=1)))
    key_data, temperature, greedy_rows = row_arrays
    return grown, (pad(key_data), pad(temperature, value=1.0), pad(greedy_rows, value=True))


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _splice(carry, row_arrays, new, new_rows, slots, index):
    """`new` (the carry of freshly prefilled rows, their cache `length` columns long) written into `slots` of
    `carry`, its cache columns moved so that the prompts end at the cursor `index`, the rest of those rows masked
    (position -1). Left padding may wrap round to the end, or be cut where it is longer than the cache: either way
    it stays padding (a prompt itself is never longer than `index`)."""
    size = carry["cache"]["pos"].shape[1]

    def columns(x, fill, axis):   # x's `axis` (length long) -> the cache's columns
        x = jax.lax.slice_in_dim(x, max(0, x.shape[axis] - size), x.shape[axis], axis=axis)
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, size - x.shape[axis])
        return jnp.roll(jnp.pad(x, widths, constant_values=fill), index - x.shape[axis], axis=axis)
    cache, fresh = carry["cache"], new["cache"]
    def set_rows(old, new):  # a k / v buffer: the new rows at `slots`
        return _map_kv(lambda x, rows, cols, n: x.at[(slice(None),) * rows + (slots,)].set(columns(n, 0, cols)),
                       old, new)
    out = dict(carry, cache=dict(cache, k=set_rows(cache["k"], fresh["k"]), v=set_rows(cache["v"], fresh["v"]),
                                 pos=cache["pos"].at[slots].set(columns(fresh["pos"], -1, 1))))
    out["step"] = carry["step"].at[slots].set(new["step"])
    for name in ("token", "position", "done", "window"):
        out[name] = carry[name].at[slots].set(new[name])
    return out, tuple(old.at[slots].set(value) for old, value in zip(row_arrays, new_rows))


def next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


# ------------------------------------------------------------------------------------------------ text in, text out


@dataclasses.dataclass
class Completion:
    """One generated continuation."""
    prompt: str
    text: str                   # the generated text (without the prompt, cut before a stop string)
    tokens: list                # generated ids (a stop token included, tokens after a stop string cut)
    logprobs: np.ndarray        # float32 [len(tokens)]
    finish_reason: str          # "stop" (end-of-text or a stop string) or "length"
    top_ids: np.ndarray | None = None    # [len(tokens), n]
    top_probs: np.ndarray | None = None


def generate(model, tokenizer, prompts, key, sampling: Sampling = Sampling(), max_new_tokens: int = 64,
             stop=(), stop_at_eot: bool = True, num_samples: int = 1, top_candidates: int = 0,
             mesh=None) -> list[Completion]:
    """Completions of `prompts` (a string or a list; "" starts a new document), `num_samples` each, prompt-major.

    stop: strings that end a completion; the text is cut before the first one (it is matched in the decoded
    text, so it stops a completion whichever way it was tokenized, and as token ids inside the loop to stop early).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    rows = [p for p in prompts for _ in range(num_samples)]
    stop = [stop] if isinstance(stop, str) else list(stop)
    # An empty prompt starts a new document: the model saw end-of-text before every document.
    out = generate_ids(model, [tokenizer.encode(p) or [tokenizer.eot_id] for p in rows], key, max_new_tokens, sampling,
                       stop_ids=[tokenizer.eot_id] if stop_at_eot else (),
                       stop_sequences=[tokenizer.encode(s) for s in stop], vocab_size=tokenizer.n_vocab,
                       top_candidates=top_candidates, mesh=mesh)
    return [_completion(tokenizer, prompt, out, row, stop, stop_at_eot) for row, prompt in enumerate(rows)]


def _completion(tokenizer, prompt, out: TokenOutput, row, stop, stop_at_eot) -> Completion:
    n = int(out.lengths[row])
    ids = out.tokens[row, :n].tolist()
    finish = "stop" if out.stopped[row] else "length"
    text_ids = ids[:-1] if stop_at_eot and ids and ids[-1] == tokenizer.eot_id else ids
    text = tokenizer.decode(text_ids)
    cut = _first_stop(text, stop)
    if cut is not None:
        text, n, finish = text[:cut], _tokens_covering(tokenizer, ids, cut), "stop"
        ids = ids[:n]
    extra = {}
    if out.top_ids is not None:
        extra = dict(top_ids=out.top_ids[row, :n], top_probs=out.top_probs[row, :n])
    return Completion(prompt, text, ids, out.logprobs[row, :n], finish, **extra)


def _first_stop(text, stop):
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _tokens_covering(tokenizer, ids, n_chars):
    """How many of `ids` it takes to produce the stop string that begins at text[n_chars]."""
    for n in range(len(ids) + 1):
        if len(tokenizer.decode(ids[:n])) > n_chars:
            return n
    return len(ids)


# ------------------------------------------------------------------------------------------------ scoring text


def score_tokens(model, tokens, lengths=None):
    """How the model rates given text: (logprobs, is_greedy), each [B, T - 1], zero / False beyond a row's length.

    logprobs[:, t - 1] = log p(tokens[:, t] | tokens[:, :t]); is_greedy[:, t - 1]: tokens[:, t] is the argmax.
    tokens: int32 [B, T] right-padded rows; lengths [B] (default: all T).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    lengths = jnp.full((tokens.shape[0],), tokens.shape[1]) if lengths is None else jnp.asarray(lengths)
    graphdef, state = nnx.split(model)
    return _score_tokens(state, tokens, lengths, graphdef=graphdef)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_tokens(state, tokens, lengths, *, graphdef):
    logits = nnx.merge(graphdef, state)(tokens)[:, :-1]
    targets = tokens[:, 1:]
    logprobs = lm_model.token_logprobs(logits, targets)
    valid = jnp.arange(1, tokens.shape[1])[None, :] < lengths[:, None]
    return jnp.where(valid, logprobs, 0.0), valid & (jnp.argmax(logits, -1) == targets)


# ------------------------------------------------------------------------------------------------ CLI

FLAGS = flags.FLAGS
SHOW_TOP = 5  # candidates --show_probs prints per step


def define_sampling_flags(max_new_tokens_default: str) -> None:
    """--temperature, --top_k, --top_p (None: the run's config.sample), --max_new_tokens (None: the program's
    default, named by `max_new_tokens_default`) and --seed: every sampling program's flags (lm.sample, lm.chat)."""
    flags.DEFINE_float("temperature", None, "0 is greedy (default: config.sample.temperature).")
    flags.DEFINE_integer("top_k", None, "Keep the k most probable tokens; 0 keeps all (default: config).")
    flags.DEFINE_float("top_p", None, "Keep the smallest set with this much probability (default: config).")
    flags.DEFINE_integer("max_new_tokens", None, f"Tokens to generate at most (default: {max_new_tokens_default}).")
    flags.DEFINE_integer("seed", 0, "PRNG seed: the same seed gives the same text.")


def sampling_from_flags(config) -> Sampling:
    """The run's config.sample with the sampling flags that are set on top (define_sampling_flags)."""
    return Sampling.from_config(config.get("sample") or {}, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                top_p=FLAGS.top_p)


def define_flags():
    """Flags exist only when run as a program, so importing this module never clashes with another's flags."""
    flags.DEFINE_string("workdir", None, "Run directory with checkpoints/ and tokenizer/.", required=True)
    flags.DEFINE_multi_string("prompt", [], "Prompt text (repeat the flag for a batch). Default: read stdin.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    define_sampling_flags("config.sample.max_new_tokens")
    flags.DEFINE_integer("num_samples", None, "Samples per prompt (default: config.sample.num_samples).")
    flags.DEFINE_multi_string("stop", [], "Stop string (repeatable); end-of-text always stops.")
    flags.DEFINE_bool("show_probs", False, "Also print, per step, the chosen token and the most probable ones "
                      "with the model's probabilities (temperature 1, before top-k / top-p).")
    lm_mesh.define_distributed_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from lm import checkpoint  # only the program reads checkpoints
    lm_mesh.initialize_distributed()
    model, tok, config, meta = checkpoint.load_run(FLAGS.workdir, step=FLAGS.step)
    sample_config = config.get("sample") or {}
    sampling = sampling_from_flags(config)
    num_samples = FLAGS.num_samples or int(sample_config.get("num_samples", 1))
    if sampling.greedy and num_samples > 1:
        logging.warning("temperature 0 is greedy: the %d samples per prompt would be identical; printing one",
                        num_samples)
        num_samples = 1
    max_new_tokens = FLAGS.max_new_tokens or int(sample_config.get("max_new_tokens", 64))
    prompts = FLAGS.prompt or [sys.stdin.read()]
    logging.info("step %s, %s, %d sample(s) of up to %d tokens", meta.get("step"), sampling, num_samples,
                 max_new_tokens)
    completions = generate(model, tok, prompts, jax.random.key(FLAGS.seed), sampling, max_new_tokens,
                           stop=FLAGS.stop, num_samples=num_samples,
                           top_candidates=SHOW_TOP if FLAGS.show_probs else 0)
    for i, c in enumerate(completions):
        if len(completions) > 1:
            print(("\n" if i else "") + f"----- sample {i + 1} of {len(completions)}")
        print(c.text)
        if FLAGS.show_probs:
            print(format_probs(tok, c))
        logging.info("sample %d: %d tokens, finish %s, mean log-prob %.3f", i + 1, len(c.tokens), c.finish_reason,
                     float(np.mean(c.logprobs)) if len(c.tokens) else 0.0)


def format_probs(tokenizer, completion: Completion) -> str:
    """One line per generated step: the chosen token with its probability, then the model's top candidates."""
    lines = []
    for step, token in enumerate(completion.tokens):
        candidates = "  ".join(f"{_show(tokenizer, i)} {p:.1%}"
                               for i, p in zip(completion.top_ids[step], completion.top_probs[step]))
        lines.append(f"{step + 1:3d} chose {_show(tokenizer, token)} "
                     f"({np.exp(completion.logprobs[step]):.1%}) | {candidates}")
    return "\n".join(lines)


def _show(tokenizer, token_id) -> str:
    return repr(tokenizer.decode_bytes([int(token_id)]).decode("utf-8", errors="backslashreplace"))


if __name__ == "__main__":
    define_flags()
    app.run(main)
