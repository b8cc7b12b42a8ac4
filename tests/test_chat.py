"""lm.chat: which run it picks, the streamed answer equals lm.sample's greedy decode, a real interactive session on a
pseudo-terminal (streaming, /temperature, /reset, /help, an over-long message, /quit), context trimming, and a
scripted model (weights set by hand) that thinks, answers with multi-byte characters and ends its turn."""
import io
import os
import pathlib
import pty
import select
import subprocess
import sys
import time

import jax
import pytest

from lm import chat, sample
from lm.tokenizer import chat as template
from tests.conftest import CHAT_MAX_LEN as MAX_LEN
from tests.conftest import SCRIPT_ANSWER, SCRIPT_THINKING, scripted_model

NEW = 24
REPO = pathlib.Path(__file__).resolve().parents[1]
LENGTH_NOTICE = "[stopped at the length limit"


def greedy_answer(model, tok, messages, max_new_tokens=NEW):
    """The reply text lm.chat must print: one greedy generate_ids call, stop tokens not shown."""
    ids = template.render_for_completion(tok, messages)
    stops = [tok.token_id(template.ASSISTANT_END), tok.eot_id]
    out = sample.generate_ids(model, [ids], jax.random.key(0), max_new_tokens, sample.Sampling(temperature=0),
                              stop_ids=stops, vocab_size=tok.n_vocab)
    tokens = out.tokens[0, :out.lengths[0]].tolist()
    assert not out.stopped[0], "the random model ended its turn by chance: pick another seed"
    return tok.decode([t for t in tokens if t not in stops])


def run_chat(*args, timeout=180):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "lm.chat", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


# ------------------------------------------------------------------------------------------------ which run


def test_find_chat_run_prefers_the_most_trained_stage(tmp_path):
    def make(*parts):
        (tmp_path.joinpath(*parts) / "checkpoints" / "5").mkdir(parents=True)
    make()
    assert chat.find_chat_run(tmp_path) == (tmp_path, chat.BASE)
    make("sft")
    assert chat.find_chat_run(tmp_path) == (tmp_path / "sft", "sft")
    make("grpo")
    make("ppo")
    assert chat.find_chat_run(tmp_path) == (tmp_path / "grpo", "grpo")
    assert chat.find_chat_run(tmp_path, "ppo") == (tmp_path / "ppo", "ppo")
    assert chat.find_chat_run(tmp_path, "base") == (tmp_path, chat.BASE)
    assert chat.find_chat_run(tmp_path / "sft") == (tmp_path / "sft", "sft")       # a run directory itself
    assert chat.find_chat_run(tmp_path, str(tmp_path / "sft")) == (tmp_path / "sft", "sft")
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        chat.find_chat_run(tmp_path / "sft" / "checkpoints" / "5")
    with pytest.raises(FileNotFoundError, match="reward"):
        chat.find_chat_run(tmp_path, "reward")


# ------------------------------------------------------------------------------------------------ the CLI


def test_message_answers_once_with_the_greedy_tokens_and_exits(chat_workdir, sft_model, tok):
    result = run_chat(f"--workdir={chat_workdir}", "--message=hi", "--temperature=0", f"--max_new_tokens={NEW}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == greedy_answer(sft_model, tok, [{"role": "user", "content": "hi"}]) + "\n"
    assert f"[stopped at the length limit: max_new_tokens={NEW}]" in result.stderr
    assert "not chat-tuned" not in result.stderr


class Terminal:
    """A real `python -m lm.chat` on a pseudo-terminal; reads are kept with their arrival times."""

    def __init__(self, *args):
        self.master, slave = pty.openpty()
        env = dict(os.environ, PYTHONPATH=str(REPO), TERM="dumb")
        self.process = subprocess.Popen([sys.executable, "-m", "lm.chat", *args], stdin=slave, stdout=slave,
                                        stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.reads = []  # (time, text) of every os.read since the last send
        self.pending = ""  # read but not yet consumed by read_until

    def read_until(self, marker: str, timeout: float = 180) -> str:
        """The output up to and including the next `marker` (what follows stays for the next call)."""
        text, deadline = self.pending, time.monotonic() + timeout
        while marker not in text:
            left = deadline - time.monotonic()
            if left <= 0 or self.process.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"no {marker!r} after {timeout}s; got {text[-2000:]!r}")
            if select.select([self.master], [], [], min(left, 1.0))[0]:
                try:
                    chunk = os.read(self.master, 4096).decode("utf-8", "replace").replace("\r", "")
                except OSError:  # the child closed the terminal
                    continue
                self.reads.append((time.monotonic(), chunk))
                text += chunk
        end = text.index(marker) + len(marker)
        text, self.pending = text[:end], text[end:]
        return text

    def send(self, line: str) -> None:
        self.reads = []
        os.write(self.master, (line + "\n").encode())

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        os.close(self.master)


def chat_transcript(model, tok, messages):
    """What an in-process greedy Chat writes for each message in turn: answer and notices, in order."""
    out = io.StringIO()
    session = chat.Chat(model, tok, sample.Sampling(temperature=0), NEW, notice=lambda text: out.write(text + "\n"))
    transcript = []
    for message in messages:
        session.reply(message, out)
        transcript.append(out.getvalue())
        out.seek(0)
        out.truncate()
    return transcript


def answer_in(text: str, line: str) -> str:
    """The answer printed after the echoed input `line` (up to the length-limit notice that ends `text`)."""
    after = text.split(line + "\n", 1)[1]
    return after[:-len("\n" + LENGTH_NOTICE)]


def test_interactive_session_on_a_terminal(chat_workdir, base_model, tok):
    """--run=base: the base model, with a warning; every command, streaming, and answers equal to lm.sample's."""
    term = Terminal(f"--workdir={chat_workdir}", "--run=base", f"--max_new_tokens={NEW}")
    try:
        assert "not chat-tuned" in term.read_until("/help for commands]")
        term.read_until("> ")
        # 1. the answer streams: its text arrives in several reads, before the end-of-answer notice
        term.send("hello")
        term.read_until(LENGTH_NOTICE)
        answer_reads = [chunk for _, chunk in term.reads if chunk.strip() and "[stopped" not in chunk
                        and "hello" not in chunk]
        assert len(answer_reads) >= 2, term.reads
        term.read_until("> ")
        # 2. /temperature 0 makes it greedy; /reset forgets the first turn: the same message then gets the answer
        # a fresh conversation gets (with the first turn in the history, it would be another prompt)
        term.send("/temperature 0")
        term.read_until("[temperature 0 (greedy)]")
        term.read_until("> ")
        term.send("/reset")
        term.read_until("[conversation cleared]")
        term.read_until("> ")
        term.send("hi")
        first = answer_in(term.read_until(LENGTH_NOTICE), "hi")
        assert first == greedy_answer(base_model, tok, [{"role": "user", "content": "hi"}])
        term.read_until("> ")
        # 3. a second turn: what an in-process lm.chat.Chat writes, notices included (a random model's text
        # re-encodes to many tokens, so the context may be full and the first turn dropped; trimming is tested below)
        transcript = chat_transcript(base_model, tok, ["hi", "hi"])
        assert transcript[0].startswith(first + "\n[stopped at the length limit")
        term.send("hi")
        second = term.read_until(LENGTH_NOTICE).split("hi\n", 1)[1]
        assert second == transcript[1][:transcript[1].index(LENGTH_NOTICE) + len(LENGTH_NOTICE)]
        term.read_until("> ")
        # 4. an over-long message is refused with a clear line, and the session goes on
        message = "word " * MAX_LEN
        n = len(template.render_for_completion(tok, [{"role": "user", "content": message}]))
        term.send(message)
        term.read_until(f"message too long: {n} tokens with the chat template, but the context holds "
                        f"{MAX_LEN - NEW} (max_len {MAX_LEN} - max_new_tokens {NEW} kept for the answer); not sent")
        term.read_until("> ")
        term.send("/help")
        assert "/temperature X" in term.read_until("/quit")
        term.read_until("> ")
        term.send("/quit")
        assert term.process.wait(timeout=60) == 0
    finally:
        term.close()


# ------------------------------------------------------------------------------------------------ in process


def test_oldest_turns_are_dropped_when_the_context_is_full(sft_model, tok):
    notices = []
    session = chat.Chat(sft_model, tok, sample.Sampling(temperature=0), max_new_tokens=32, notice=notices.append)
    turn = ({"role": "user", "content": "a question " * 4}, {"role": "assistant", "content": "an answer " * 4})
    session.turns = [turn] * 10
    ids = session.prompt_ids("hi")
    assert len(ids) <= MAX_LEN - 32 and 0 < len(session.turns) < 10
    assert notices == [f"[context full: dropped the oldest {10 - len(session.turns)} turn(s); "
                       f"{len(session.turns)} kept]"]
    # what is kept is exactly the newest turns, rendered by the template
    kept = [m for t in session.turns for m in t]
    assert ids == template.render_for_completion(tok, kept + [{"role": "user", "content": "hi"}])
    one_more = template.render_for_completion(tok, [m for t in [turn] * (len(session.turns) + 1) for m in t]
                                              + [{"role": "user", "content": "hi"}])
    assert len(one_more) > MAX_LEN - 32   # and no more would fit
    kept_before = list(session.turns)
    with pytest.raises(chat.MessageTooLong, match="message too long"):
        session.reply("word " * MAX_LEN, io.StringIO())
    assert session.turns == kept_before and session.replies == 0


@pytest.mark.parametrize("styled", [False, True])
def test_scripted_model_thinks_answers_and_ends_its_turn(config, tok, styled):
    prompt = template.render_for_completion(tok, [{"role": "user", "content": "hi"}])
    model, script = scripted_model(config, tok, len(prompt))
    assert len(tok.encode("👋")) > 1  # a character split over tokens: the stream decoder must keep it whole
    notices, out = [], io.StringIO()
    session = chat.Chat(model, tok, sample.Sampling(temperature=1.0), max_new_tokens=NEW, notice=notices.append)
    reply = session.reply("hi", out, styled=styled)
    assert reply.tokens == script and reply.finish_reason == "stop"    # stopped at <|assistant_end|>, not at NEW
    assert (reply.thinking, reply.answer) == (SCRIPT_THINKING, SCRIPT_ANSWER)
    assert notices == []                                               # no length-limit notice
    if styled:
        assert out.getvalue() == f"{chat.DIM}{SCRIPT_THINKING}{chat.RESET_STYLE}\n{SCRIPT_ANSWER}\n"
    else:
        assert out.getvalue() == f"(thinking) {SCRIPT_THINKING}\n{SCRIPT_ANSWER}\n"
    assert session.turns == [({"role": "user", "content": "hi"},
                              {"role": "assistant", "content": SCRIPT_ANSWER, "thinking": SCRIPT_THINKING})]


def test_answer_writer_keeps_multibyte_characters_whole(tok):
    ids = tok.encode("a👋b€")
    assert len(ids) > 3
    out = io.StringIO()
    writer = chat.AnswerWriter(tok, out, styled=False)
    seen = []
    for token in ids:
        writer.feed(token)
        seen.append(out.getvalue())
    writer.close()
    assert out.getvalue() == "a👋b€\n" and "\ufffd" not in "".join(seen)
    assert len(set(seen)) >= 3  # the text grew token by token
