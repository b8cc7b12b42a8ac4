"""lm.serve as a real server (a subprocess on a free loopback port) driven by the official `openai` client and by raw
HTTP: models listed, chat streamed and not (answers equal to lm.sample's greedy decode done here), reasoning split
from the answer (a scripted model that thinks), base-model completions, stop strings, n and seed, 8 concurrent
streams batched together with answers equal to each one alone, and every kind of bad request refused with an
OpenAI-style 4xx while the server goes on serving."""
import concurrent.futures
import json
import os
import pathlib
import select
import subprocess
import sys
import time

import httpx
import jax
import pytest

from lm import sample
from lm.serve import text as serve_text
from lm.tokenizer import chat as template
from tests.conftest import CHAT_MAX_LEN as MAX_LEN
from tests.conftest import SCRIPT_ANSWER, SCRIPT_THINKING, save_run, scripted_model

openai = pytest.importorskip("openai")

REPO = pathlib.Path(__file__).resolve().parents[1]
NEW = 16
HI = [{"role": "user", "content": "hi"}]


class Server:
    """`python -m lm.serve` on 127.0.0.1, a free port; its stderr goes to a file shown when something fails."""

    def __init__(self, workdir, log_path, *args, timeout=180):
        env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
                   XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8",
                                                                     "").strip())
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "lm.serve", f"--workdir={workdir}", "--port=0", *args],
                                        stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        deadline = time.monotonic() + timeout
        while not select.select([self.process.stdout], [], [], 0.5)[0]:
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise AssertionError(f"the server printed no URL in {timeout}s:\n{self.stderr()}")
        self.url = self.process.stdout.readline().strip()
        assert self.url.startswith("http://127.0.0.1:"), (self.url, self.stderr())

    def stderr(self) -> str:
        self.log.flush()
        return pathlib.Path(self.log_path).read_text()[-4000:]

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def workdir(chat_workdir, tok, config):
    """chat_workdir (tokenizer/, a random base model and sft/ run) and a grpo/ run whose scripted model thinks,
    then answers "hi" and ends its turn."""
    model, _ = scripted_model(config, tok, len(template.render_for_completion(tok, HI)))
    save_run(chat_workdir / "grpo", config, tok, model=model)
    return chat_workdir


@pytest.fixture(scope="module")
def server(workdir, tmp_path_factory):
    server = Server(workdir, tmp_path_factory.mktemp("log") / "serve.log", "--max_batch=16", "--batch_window_ms=50")
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def greedy_tokens(model, tok, prompt, stops, max_new_tokens=NEW):
    out = sample.generate_ids(model, [prompt], jax.random.key(0), max_new_tokens, sample.Sampling(temperature=0),
                              stop_ids=stops, vocab_size=tok.n_vocab)
    return out.tokens[0, :out.lengths[0]].tolist(), bool(out.stopped[0])


def greedy_chat(model, tok, messages, max_new_tokens=NEW):
    """(answer, finish_reason) the server must give: lm.sample's greedy decode, parsed by the chat template."""
    stops = [tok.token_id(template.ASSISTANT_END), tok.eot_id]
    tokens, stopped = greedy_tokens(model, tok, template.render_for_completion(tok, messages), stops, max_new_tokens)
    return template.parse_completion(tok, [t for t in tokens if t not in stops]).answer, \
        "stop" if stopped else "length"


def streamed(client, **request):
    """(content, reasoning, finish_reason, number of content deltas) of a streamed chat completion."""
    content, reasoning, finish, deltas = "", "", None, 0
    for chunk in client.chat.completions.create(stream=True, **request):
        assert chunk.object == "chat.completion.chunk" and chunk.id.startswith("chatcmpl-")
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            deltas += bool(choice.delta.content)
            finish = choice.finish_reason or finish
    return content, reasoning, finish, deltas


# ------------------------------------------------------------------------------------------------ the happy paths


def test_lists_the_stage_models(client, server, workdir):
    models = client.models.list()
    assert [m.id for m in models.data] == ["base", "sft", "grpo"]
    assert all(m.object == "model" and m.owned_by == "lm" and m.created > 0 for m in models.data)
    assert client.models.retrieve("sft").id == "sft"
    health = httpx.get(server.url + "/health").json()
    assert health["loaded"] == ["grpo"]        # the default (the most trained stage) is loaded at start, no other


def test_chat_non_streamed_and_streamed_equal_the_greedy_decode(client, sft_model, tok):
    expected, finish = greedy_chat(sft_model, tok, HI)
    assert finish == "length" and expected
    response = client.chat.completions.create(model="sft", messages=HI, temperature=0, max_tokens=NEW)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.model == "sft" and response.created > 0
    [choice] = response.choices
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", expected, "length")
    prompt_tokens = len(template.render_for_completion(tok, HI))
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == \
        (prompt_tokens, NEW, prompt_tokens + NEW)
    content, reasoning, finish, deltas = streamed(client, model="sft", messages=HI, temperature=0, max_tokens=NEW)
    assert (content, reasoning, finish) == (expected, "", "length")
    assert deltas >= 3                          # it arrived in pieces, not at once


def test_raw_stream_has_openai_chunks_usage_and_done(server, tok):
    body = dict(model="sft", messages=HI, temperature=0, max_tokens=4, stream=True,
                stream_options={"include_usage": True})
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-2]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert len({c["id"] for c in chunks}) == 1


def test_thinking_comes_apart_from_the_answer(client):
    """grpo's scripted model writes <|think_start|> thinking <|think_end|> answer <|assistant_end|>."""
    response = client.chat.completions.create(model="grpo", messages=HI, max_tokens=48)
    [choice] = response.choices
    assert choice.message.content == SCRIPT_ANSWER and choice.finish_reason == "stop"
    assert choice.message.reasoning_content == SCRIPT_THINKING
    content, reasoning, finish, _ = streamed(client, model="grpo", messages=HI, max_tokens=48)
    assert (content, reasoning, finish) == (SCRIPT_ANSWER, SCRIPT_THINKING, "stop")


def test_completions_continue_text_with_the_base_model(client, base_model, tok):
    tokens, _ = greedy_tokens(base_model, tok, tok.encode("The list"), [tok.eot_id])
    response = client.completions.create(model="base", prompt="The list", temperature=0, max_tokens=NEW)
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert response.choices[0].text == tok.decode([t for t in tokens if t != tok.eot_id])
    assert response.usage.prompt_tokens == len(tok.encode("The list"))
    pieces = [c.choices[0].text for c in client.completions.create(model="base", prompt="The list", temperature=0,
                                                                   max_tokens=NEW, stream=True)]
    assert "".join(pieces) == response.choices[0].text and len([p for p in pieces if p]) >= 3


def test_stop_strings_cut_the_answer(client, sft_model, tok):
    expected, _ = greedy_chat(sft_model, tok, HI)
    stop = expected[len(expected) // 2:][:3]
    cut = expected[:expected.index(stop)]
    response = client.chat.completions.create(model="sft", messages=HI, temperature=0, max_tokens=NEW, stop=[stop])
    assert (response.choices[0].message.content, response.choices[0].finish_reason) == (cut, "stop")
    content, _, finish, _ = streamed(client, model="sft", messages=HI, temperature=0, max_tokens=NEW, stop=stop)
    assert (content, finish) == (cut, "stop")


def test_choice_text_holds_back_a_possible_stop_string(tok):
    ids = tok.encode("abc STOP def")
    text = serve_text.ChoiceText(tok, stops=["STOP"], reasoning=False)
    pieces = [d for token in ids for d in text.feed(token)] + text.close()
    assert "".join(t for _, t in pieces) == "abc " and text.hit_stop
    assert all("S" not in t for _, t in pieces)   # no piece of the stop string was ever sent


def test_seed_makes_sampling_reproducible_and_n_gives_choices(client):
    def answers(seed):
        response = client.chat.completions.create(model="sft", messages=HI, temperature=1.0, max_tokens=NEW, n=3,
                                                  seed=seed)
        assert [c.index for c in response.choices] == [0, 1, 2]
        return [c.message.content for c in response.choices]
    first = answers(5)
    assert answers(5) == first
    assert len(set(first)) == 3                     # each choice samples afresh
    assert answers(6) != first
    # a choice's text depends on its seed and index only: alone (n=1) it is choice 0 of the batch above
    alone = client.chat.completions.create(model="sft", messages=HI, temperature=1.0, max_tokens=NEW, seed=5)
    assert alone.choices[0].message.content == first[0]


def test_concurrent_streams_are_batched_and_equal_each_alone(client, server):
    requests = [dict(model="sft", messages=[{"role": "user", "content": "hi " * i}], temperature=0, max_tokens=NEW)
                for i in range(1, 9)]
    alone = [streamed(client, **r)[0] for r in requests]
    before = httpx.get(server.url + "/health").json()["batches"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda r: streamed(client, **r)[0], requests))
    assert together == alone
    health = httpx.get(server.url + "/health").json()
    assert health["batches"] - before < 8 and health["largest_batch"] > 1    # they shared decodes


def test_a_short_request_joins_a_long_decode_and_finishes_first(client, server, sft_model, tok):
    """Continuous batching: a short request sent while a long one decodes joins its decode at the next step and
    ends first; neither answer changes (each equals lm.sample's greedy decode alone)."""
    story = [{"role": "user", "content": "tell me a story"}]
    long_tokens = MAX_LEN - 2 * len(template.render_for_completion(tok, story))
    expected_long = greedy_chat(sft_model, tok, story, long_tokens)[0]
    expected_short = greedy_chat(sft_model, tok, HI, 4)[0]
    before = httpx.get(server.url + "/health").json()["batches"]
    started, finished = concurrent.futures.Future(), {}

    def long_request():
        content = ""
        for chunk in client.chat.completions.create(model="sft", messages=story, temperature=0,
                                                    max_tokens=long_tokens, stream=True):
            if chunk.choices:
                content += chunk.choices[0].delta.content or ""
            if content and not started.done():
                started.set_result(time.monotonic())
        finished["long"] = time.monotonic()
        return content

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long_answer = pool.submit(long_request)
        started.result(timeout=120)          # the long one is decoding
        short = client.chat.completions.create(model="sft", messages=HI, temperature=0, max_tokens=4)
        finished["short"] = time.monotonic()
        assert "long" not in finished        # the short one did not wait for it
        assert long_answer.result(timeout=120) == expected_long
    assert short.choices[0].message.content == expected_short and finished["short"] < finished["long"]
    assert httpx.get(server.url + "/health").json()["batches"] == before + 1    # one decode held both


def test_drop_oldest_turns_fits_a_long_conversation(server, tok):
    turn = [{"role": "user", "content": "a question " * 4}, {"role": "assistant", "content": "an answer " * 4}]
    messages = [{"role": "system", "content": "be brief"}] + turn * 6 + HI
    body = dict(model="sft", messages=messages, temperature=0, max_tokens=NEW)
    refused = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert refused.json()["error"]["code"] == "context_length_exceeded"
    response = httpx.post(server.url + "/v1/chat/completions", json=dict(body, drop_oldest_turns=True), timeout=120)
    dropped = int(response.headers["X-Dropped-Turns"])
    kept = messages[:1] + messages[1 + 2 * dropped:]
    prompt = template.render_for_completion(tok, kept)
    assert 0 < dropped < 6 and len(prompt) + NEW <= MAX_LEN               # it fits ...
    assert len(template.render_for_completion(tok, messages[:1] + messages[2 * dropped - 1:])) + NEW > MAX_LEN
    assert response.json()["usage"]["prompt_tokens"] == len(prompt)       # ... and one turn more would not
    alone = httpx.post(server.url + "/v1/chat/completions", json=dict(body, messages=kept), timeout=120).json()
    assert response.json()["choices"] == alone["choices"]


# ------------------------------------------------------------------------------------------------ bad requests


BAD_REQUESTS = [
    # (path, body (bytes: sent raw), status, param, code)
    ("/v1/chat/completions", b"{not json", 400, None, "invalid_json"),
    ("/v1/chat/completions", b"[1, 2]", 400, None, "invalid_json"),
    ("/v1/chat/completions", {"model": "nope", "messages": HI}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": HI + [{"role": "assistant", "content": "x"}]}, 400, "messages",
     "invalid_value"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * MAX_LEN}]}, 400, "messages",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": MAX_LEN}, 400, "max_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": "many"}, 400, "max_tokens", "invalid_type"),
    ("/v1/chat/completions", {"messages": HI, "n": 0}, 400, "n", "invalid_value"),
    ("/v1/chat/completions", {"messages": HI, "n": 100}, 400, "n", "invalid_value"),
    ("/v1/chat/completions", {"messages": HI, "temperature": -1}, 400, "temperature", "invalid_value"),
    ("/v1/chat/completions", {"messages": HI, "top_p": 0}, 400, "top_p", "invalid_value"),
    ("/v1/chat/completions", {"messages": HI, "stop": [""]}, 400, "stop", "invalid_value"),
    ("/v1/chat/completions", {"messages": HI, "logprobs": True}, 400, "logprobs", "unsupported_parameter"),
    ("/v1/completions", {"model": "base", "prompt": 3}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": "base", "prompt": "word " * MAX_LEN}, 400, "prompt", "context_length_exceeded"),
    ("/v1/nothing", {}, 404, None, None),
]


@pytest.mark.parametrize("path,body,status,param,code", BAD_REQUESTS)
def test_bad_requests_get_an_openai_error_and_the_server_goes_on(server, path, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"},
                          timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert server.alive()
    ok = httpx.post(server.url + "/v1/chat/completions",
                    json={"model": "sft", "messages": HI, "max_tokens": 2, "temperature": 0}, timeout=120)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_openai_client_raises_on_bad_requests(client):
    with pytest.raises(openai.NotFoundError, match="does not exist") as error:
        client.chat.completions.create(model="nope", messages=HI)
    assert error.value.code == "model_not_found" and error.value.param == "model"
    with pytest.raises(openai.BadRequestError, match="context is 128 tokens") as error:
        client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "word " * MAX_LEN}])
    assert error.value.code == "context_length_exceeded"


def test_a_client_that_leaves_mid_stream_does_not_stop_the_server(server, client):
    body = dict(model="sft", messages=HI, temperature=0, max_tokens=MAX_LEN // 2, stream=True)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as response:
        next(response.iter_lines())   # the first chunk, then hang up
    assert server.alive()
    assert client.chat.completions.create(model="sft", messages=HI, max_tokens=3,
                                          temperature=0).usage.completion_tokens == 3
