"""The FastAPI app: the web chat page at `/` and an OpenAI-compatible API under `/v1`.

    GET  /                      the chat page (lm/serve/static: no external assets)
    GET  /v1/models             the stage models found in the workdir (base, sft, ppo, grpo)
    GET  /v1/models/{model}
    POST /v1/chat/completions   messages -> answer; stream, temperature, top_p, max_tokens, stop, n, seed
    POST /v1/completions        text continuation (the base model's API): prompt -> text; the same settings
    GET  /health

Responses have OpenAI's shapes. A chat request is rendered with lm.tokenizer.chat.render_for_completion and its
answer ends at <|assistant_end|> (or end-of-text); a reasoning model's thinking (<|think_start|> ... <|think_end|>,
split by lm.tokenizer.chat.parse_completion) comes in `reasoning_content` beside `content`, in the message and in
streamed deltas. `stop` strings cut the content (stop tokens are never shown). usage counts prompt tokens once per
prompt and every generated token, a stop token included. A bad request gets a 4xx with
`{"error": {"message", "type", "param", "code"}}`; unsupported options that would change the output (logprobs,
penalties, tools, ...) are refused rather than ignored.

One extension: `"drop_oldest_turns": true` in a chat request drops the oldest user/assistant turns while the
conversation does not fit the context with max_tokens (as lm.chat does); the `X-Dropped-Turns` response header
says how many were dropped. The chat page sends it.
"""
import asyncio
import dataclasses
import json
import pathlib
import secrets
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from lm.serve import engine as lm_engine
from lm.serve.text import CONTENT, ChoiceText, cut_at_stop
from lm.tokenizer import chat as template

STATIC = pathlib.Path(__file__).parent / "static"
MAX_STOPS = 4                        # as OpenAI's API
DROPPED_HEADER = "X-Dropped-Turns"   # how many of the oldest turns drop_oldest_turns left out
UNSUPPORTED = {                      # options that would change the output; refused unless left at their default
    "logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []), "echo": (None, False),
    "best_of": (None, 1), "suffix": (None, ""),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    max_n: int = 8                   # choices per request at most (each is a row of the batch)
    default_max_tokens: int = 512    # when a request sets none: at most this, and what the context leaves


class APIError(Exception):
    """A request the server refuses: the status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------------ reading requests


@dataclasses.dataclass
class Options:
    """The settings shared by both generation endpoints, checked."""
    model: str
    max_tokens: int | None
    temperature: float
    top_p: float
    n: int
    seed: int
    stop: list
    stream: bool
    include_usage: bool


async def read_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}", code="invalid_json")
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def number(body: dict, name: str, default, low, high, integer: bool = False):
    """body[name] checked to be a number in [low, high] (an int when `integer`); `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise APIError(400, f"{name} must be {kind}, got {value!r}", param=name, code="invalid_type")
    if not low <= value <= high:
        raise APIError(400, f"{name}={value} is out of range: must be in [{low}, {high}]", param=name,
                       code="invalid_value")
    return value


def options(body: dict, models: lm_engine.Models, settings: Settings) -> Options:
    for name, defaults in UNSUPPORTED.items():
        if body.get(name) not in defaults:
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    model = body.get("model") or models.default
    if not isinstance(model, str) or model not in models.paths:
        raise APIError(404, f"the model {model!r} does not exist; this server has {models.names}", param="model",
                       code="model_not_found")
    max_tokens = number(body, "max_completion_tokens", None, 1, 2**31, integer=True)
    max_tokens = number(body, "max_tokens", max_tokens, 1, 2**31, integer=True)
    top_p = number(body, "top_p", 1.0, 0, 1)
    if top_p == 0:
        raise APIError(400, "top_p=0 keeps no token: use a value in (0, 1], or temperature=0 for greedy",
                       param="top_p", code="invalid_value")
    seed = number(body, "seed", None, -2**63, 2**63 - 1, integer=True)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be a boolean, got {stream!r}", param="stream", code="invalid_type")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options", code="invalid_type")
    return Options(model=model, max_tokens=max_tokens, temperature=float(number(body, "temperature", 1.0, 0, 2)),
                   top_p=float(top_p), n=number(body, "n", 1, 1, settings.max_n, integer=True),
                   seed=secrets.randbits(63) if seed is None else seed, stop=stop_strings(body.get("stop")),
                   stream=stream, include_usage=bool(stream_options.get("include_usage")))


def stop_strings(stop) -> list:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise APIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} such strings, "
                       f"got {stop!r}", param="stop", code="invalid_value")
    return stops


def chat_messages(body: dict) -> list[dict]:
    """The request's messages as lm.tokenizer.chat messages (system/developer, user, assistant; text content)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of messages", param="messages", code="invalid_value")
    converted = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] is not an object", param=f"messages[{i}]", code="invalid_value")
        role = "system" if message.get("role") == "developer" else message.get("role")
        converted.append({"role": role, "content": message_text(message.get("content"), i)})
        if role == "assistant" and isinstance(message.get("reasoning_content"), str):
            converted[-1]["thinking"] = message["reasoning_content"]
    try:
        template.validate(converted, "messages", need_answer=False)
    except template.ConversationError as error:
        raise APIError(400, str(error), param="messages", code="invalid_value")
    if converted[-1]["role"] != "user":
        raise APIError(400, f"messages: the last message must be a user message, not {converted[-1]['role']}",
                       param="messages", code="invalid_value")
    return converted


def message_text(content, i: int) -> str:
    """A message's content: a string, or a list of text parts ({"type": "text", "text": ...}) joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts, got {content!r:.80}",
                   param=f"messages[{i}].content", code="invalid_value")


def completion_prompts(body: dict, tokenizer) -> list[list[int]]:
    """/v1/completions' prompt: a string, a list of strings, a list of token ids, or a list of such lists."""
    prompt = body.get("prompt", "")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise APIError(400, "prompt must be a string, a list of strings or a list of token ids", param="prompt",
                       code="invalid_value")
    prompts = []
    for p in prompt:
        if isinstance(p, str):
            prompts.append(tokenizer.encode(p) or [tokenizer.eot_id])   # "" starts a document, as lm.sample does
        elif isinstance(p, list) and p and all(type(t) is int and 0 <= t < tokenizer.n_vocab for t in p):
            prompts.append(p)
        else:
            raise APIError(400, f"prompt entry {p!r:.80} is neither a string nor a list of token ids "
                           f"in [0, {tokenizer.n_vocab})", param="prompt", code="invalid_value")
    return prompts


def chat_prompt(tokenizer, messages: list[dict], drop_oldest_turns: bool, budget: int) -> tuple[list[int], int]:
    """(prompt ids, turns dropped): the rendered conversation; with drop_oldest_turns (this server's extension, what
    the chat page sends), the oldest user/assistant turns are left out while the prompt is over `budget` tokens
    and more than the last message is left (the system message stays)."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    dropped = 0
    while True:
        prompt = template.render_for_completion(tokenizer, system + turns, where="messages")
        if not drop_oldest_turns or len(prompt) <= budget or len(turns) == 1:
            return prompt, dropped
        turns, dropped = turns[2:], dropped + 1


def answer_room(max_len: int, settings: Settings) -> int:
    """What drop_oldest_turns keeps free for an answer when a request sets no max_tokens (lm.chat's default)."""
    return min(settings.default_max_tokens, max_len // 2)


def token_budget(prompt_len: int, max_tokens: int | None, max_len: int, settings: Settings, param: str) -> int:
    """The tokens a row may generate; context_length_exceeded when the prompt (and max_tokens) do not fit."""
    room = max_len - prompt_len
    if room < 1:
        raise APIError(400, f"this model's context is {max_len} tokens; the prompt has {prompt_len}, leaving no "
                       f"room for an answer", param=param, code="context_length_exceeded")
    if max_tokens is None:
        return min(lm_engine.default_room(prompt_len, max_len), settings.default_max_tokens)
    if max_tokens > room:
        raise APIError(400, f"this model's context is {max_len} tokens; the prompt has {prompt_len} and "
                       f"max_tokens={max_tokens} asks for {max_tokens} more", param="max_tokens",
                       code="context_length_exceeded")
    return max_tokens


# ------------------------------------------------------------------------------------------------ running a job


class EngineFailed(Exception):
    pass


async def submit(engine: lm_engine.Engine, **job_fields) -> tuple[lm_engine.Job, asyncio.Queue]:
    """Queue a Job; its events arrive on the returned queue (put there from the engine thread)."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def emit(events):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, events)
        except RuntimeError:  # the event loop is gone (the server is shutting down)
            pass

    job = lm_engine.Job(emit=emit, **job_fields)
    engine.submit(job)
    return job, queue


async def updates(job: lm_engine.Job, queue: asyncio.Queue, texts: list[ChoiceText]):
    """(row, deltas, finish_reason or None) as the rows' tokens arrive, until every row has finished.
    Leaving early (a client gone) cancels the job's remaining rows."""
    pending = set(range(len(texts)))
    try:
        while pending:
            for event in await queue.get():
                if event[0] == "error":
                    raise EngineFailed(event[1])
                kind, row = event[0], event[1]
                if row not in pending:
                    continue
                text = texts[row]
                if kind == "token":
                    deltas = text.feed(event[2])
                    if text.hit_stop:   # a stop string: this row is done, whatever the model goes on with
                        job.end_row(row)
                        pending.discard(row)
                        yield row, deltas, "stop"
                    elif deltas:
                        yield row, deltas, None
                else:
                    pending.discard(row)
                    yield row, text.close(), event[2]
    finally:
        job.cancelled.set()


def usage(prompt_tokens: int, texts: list[ChoiceText]) -> dict:
    completion = sum(len(t.tokens) for t in texts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


# ------------------------------------------------------------------------------------------------ the app


def create_app(models: lm_engine.Models, engine: lm_engine.Engine, settings: Settings = Settings()) -> FastAPI:
    app = FastAPI(title="lm", summary="A local chat page and an OpenAI-compatible API for lm's models.")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        return JSONResponse(APIError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, error: Exception):
        body = APIError(500, f"{type(error).__name__}: {error}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": models.names, "loaded": [n for n in models.names if models.loaded(n)],
                "batches": engine.batches, "largest_batch": max(engine.batch_rows, default=0)}

    def model_card(name: str) -> dict:
        loaded = models.loaded(name)
        card = {"id": name, "object": "model", "created": models.created[name], "owned_by": "lm",
                "path": str(models.paths[name]), "default": name == models.default}
        if loaded:
            card["max_len"] = loaded.max_len
        return card

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(name) for name in models.names]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        if name not in models.paths:
            raise APIError(404, f"the model {name!r} does not exist; this server has {models.names}", param="model",
                           code="model_not_found")
        return model_card(name)

    async def prepare(body) -> tuple[Options, lm_engine.LoadedModel]:
        opts = options(body, models, settings)
        return opts, await run_in_threadpool(models.get, opts.model)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        opts, loaded = await prepare(body)
        tok = loaded.tokenizer
        prompt, dropped = chat_prompt(tok, chat_messages(body), body.get("drop_oldest_turns") is True,
                                      loaded.max_len - (opts.max_tokens or answer_room(loaded.max_len, settings)))
        max_tokens = token_budget(len(prompt), opts.max_tokens, loaded.max_len, settings, "messages")
        stop_ids = loaded.chat_stop_ids
        texts = [ChoiceText(tok, stop_ids, opts.stop) for _ in range(opts.n)]
        job, queue = await submit(engine, model=opts.model, prompts=[prompt] * opts.n, max_tokens=max_tokens,
                                  temperature=opts.temperature, top_p=opts.top_p, seed=opts.seed, stop_ids=stop_ids)
        head = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=opts.model)
        if opts.stream:
            return StreamingResponse(chat_stream(head, job, queue, texts, len(prompt), opts.include_usage),
                                     media_type="text/event-stream", headers={DROPPED_HEADER: str(dropped)})
        finishes = await collect(job, queue, texts)
        choices = []
        for row, text in enumerate(texts):
            parsed = template.parse_completion(tok, [t for t in text.tokens if t not in stop_ids])
            message = {"role": "assistant", "content": cut_at_stop(parsed.answer, opts.stop)}
            if parsed.thinking is not None:
                message["reasoning_content"] = parsed.thinking
            choices.append({"index": row, "message": message, "logprobs": None, "finish_reason": finishes[row]})
        return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                             "usage": usage(len(prompt), texts)}, headers={DROPPED_HEADER: str(dropped)})

    async def chat_stream(head, job, queue, texts, prompt_tokens, include_usage):
        chunk = dict(head, object="chat.completion.chunk")
        extra = {"usage": None} if include_usage else {}

        def choice(row, delta, finish=None):
            return sse({**chunk, "choices": [{"index": row, "delta": delta, "logprobs": None,
                                              "finish_reason": finish}], **extra})
        for row in range(len(texts)):
            yield choice(row, {"role": "assistant", "content": ""})
        try:
            async for row, deltas, finish in updates(job, queue, texts):
                for field, text in deltas:
                    yield choice(row, {field: text})
                if finish:
                    yield choice(row, {}, finish)
        except EngineFailed as error:
            yield sse(APIError(500, f"generation failed: {error}", type="server_error").body())
        if include_usage:
            yield sse({**chunk, "choices": [], "usage": usage(prompt_tokens, texts)})
        yield sse("[DONE]")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        opts, loaded = await prepare(body)
        tok = loaded.tokenizer
        prompts = completion_prompts(body, tok)
        if len(prompts) * opts.n > engine.max_batch:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={opts.n} = {len(prompts) * opts.n} rows > "
                           f"{engine.max_batch} (the server's --max_batch)", param="n", code="invalid_value")
        max_tokens = token_budget(max(map(len, prompts)), opts.max_tokens, loaded.max_len, settings, "prompt")
        rows = [p for p in prompts for _ in range(opts.n)]   # choice index = prompt index * n + sample
        stop_ids = (tok.eot_id,)
        texts = [ChoiceText(tok, stop_ids, opts.stop, reasoning=False) for _ in rows]
        job, queue = await submit(engine, model=opts.model, prompts=rows, max_tokens=max_tokens,
                                  temperature=opts.temperature, top_p=opts.top_p, seed=opts.seed, stop_ids=stop_ids)
        head = dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()),
                    model=opts.model)
        prompt_tokens = sum(map(len, prompts))
        if opts.stream:
            return StreamingResponse(completion_stream(head, job, queue, texts, prompt_tokens, opts.include_usage),
                                     media_type="text/event-stream")
        finishes = await collect(job, queue, texts)
        choices = [{"index": row, "text": text.content, "logprobs": None, "finish_reason": finishes[row]}
                   for row, text in enumerate(texts)]
        return {**head, "choices": choices, "usage": usage(prompt_tokens, texts)}

    async def completion_stream(head, job, queue, texts, prompt_tokens, include_usage):
        extra = {"usage": None} if include_usage else {}

        def choice(row, text, finish=None):
            return sse({**head, "choices": [{"index": row, "text": text, "logprobs": None, "finish_reason": finish}],
                        **extra})
        try:
            async for row, deltas, finish in updates(job, queue, texts):
                text = "".join(t for field, t in deltas if field == CONTENT)
                if text or finish:
                    yield choice(row, text, finish)
        except EngineFailed as error:
            yield sse(APIError(500, f"generation failed: {error}", type="server_error").body())
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(prompt_tokens, texts)})
        yield sse("[DONE]")

    async def collect(job, queue, texts) -> dict:
        """Every row's finish_reason once all have finished (their text is in `texts`)."""
        finishes = {}
        try:
            async for row, _, finish in updates(job, queue, texts):
                if finish:
                    finishes[row] = finish
        except EngineFailed as error:
            raise APIError(500, f"generation failed: {error}", type="server_error")
        return finishes

    return app

