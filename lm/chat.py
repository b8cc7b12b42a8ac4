"""Terminal chat with a chat-tuned run; the answer streams token by token as the model writes it.

    python -m lm.chat --workdir=runs/x                  # the newest chat-tuned run there: grpo/, ppo/, then sft/
    python -m lm.chat --workdir=runs/x --run=sft        # a stage run by name (grpo, ppo, sft, base) or a path
    python -m lm.chat --workdir=runs/x/sft --message="What is 2 + 2?"   # answer once, then exit (for scripts)
        [--temperature=0.7 --top_k=0 --top_p=1 --max_new_tokens=256 --system="..." --seed=0 --step=N]

In the chat: /reset forgets the conversation, /temperature X sets the temperature (0: greedy), /system TEXT sets
the system prompt (/system alone removes it), /help lists the commands, /quit or Ctrl-D leaves, Ctrl-C stops an
answer. Thinking (between <|think_start|> and <|think_end|>) is shown apart from the answer, dimmed on a terminal.
The conversation is rendered with lm.tokenizer.chat's template each turn and decoded by lm.sample.stream; when it
outgrows the context (max_len minus the room kept for the answer), the oldest turns are dropped, with a notice. The
answer goes to stdout; notices go to stderr. A workdir without a chat-tuned run falls back to the base model with a
warning (a base model continues text; it was never taught to end a turn).
"""
import dataclasses
import pathlib
import sys

import jax
from absl import app, flags, logging

from lm import checkpoint, sample
from lm.tokenizer import chat as template

CHAT_STAGES = ("grpo", "ppo", "dpo", "sft")  # stage runs inside a workdir, the most trained first
BASE = "base"
DIM, RESET_STYLE = "\x1b[2m", "\x1b[0m"
HELP = """commands:
  /reset           forget the conversation (the system prompt stays)
  /temperature X   sampling temperature (0: greedy)
  /system TEXT     set the system prompt (/system alone removes it)
  /help            this list
  /quit            leave (or Ctrl-D); Ctrl-C stops an answer"""


# ------------------------------------------------------------------------------------------------ which run


def find_chat_run(workdir, run: str | None = None) -> tuple[pathlib.Path, str]:
    """(run directory, stage name) to chat with; the stage is BASE for a model that was not chat-tuned.

    run: a stage name inside workdir (grpo, ppo, dpo, sft, base) or a path; default: the first of CHAT_STAGES with
    checkpoints, else workdir itself (a stage run directory by its name, anything else the base model).
    """
    workdir = pathlib.Path(workdir)
    if run == BASE:
        checkpoint.find_checkpoints(workdir)  # raises FileNotFoundError naming the directory
        return workdir, BASE
    if run is not None:
        path = workdir / run if (workdir / run).is_dir() else pathlib.Path(run)
        checkpoint.find_checkpoints(path)
        return path, _stage_of(path)
    for stage in CHAT_STAGES:
        if _has_checkpoints(workdir / stage):
            return workdir / stage, stage
    if _has_checkpoints(workdir):
        return workdir, _stage_of(workdir)
    raise FileNotFoundError(f"{workdir}: no checkpoints in {', '.join(f'{s}/' for s in CHAT_STAGES)} nor in "
                            f"{checkpoint.checkpoint_dir(workdir)}")


def _stage_of(path: pathlib.Path) -> str:
    name = path.resolve().name
    return name if name in CHAT_STAGES else BASE


def _has_checkpoints(path: pathlib.Path) -> bool:
    try:
        checkpoint.find_checkpoints(path)
        return True
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------------------------------------ showing an answer


class AnswerWriter:
    """Writes generated ids as text while they arrive: thinking apart from the answer (dimmed when `styled`), as
    lm.tokenizer.chat.CompletionStream splits them (multi-byte characters whole, stop tokens not shown)."""

    def __init__(self, tokenizer, out, styled: bool, hidden_ids=()):
        self.out, self.styled = out, styled
        self.parts = template.CompletionStream(tokenizer, hidden_ids)
        self.column = 0  # characters written on the current line (to end the answer on a fresh line)

    def feed(self, token_id: int) -> None:
        was_thinking = self.parts.thinking
        pieces = self.parts.feed(token_id)
        if self.parts.thinking and not was_thinking:
            self._write(DIM if self.styled else "(thinking) ")
        for _, text in pieces:
            self._write(text)
        if was_thinking and not self.parts.thinking:
            self._write(RESET_STYLE if self.styled else "")
            self._write("\n" if self.column else "")
        self.out.flush()

    def close(self) -> None:
        """End the answer: flush a held-back partial character, undo the dim style, end the line."""
        for _, text in self.parts.close():
            self._write(text)
        if self.parts.thinking and self.styled:
            self._write(RESET_STYLE)
        self._write("\n")
        self.out.flush()

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            last_newline = text.rfind("\n")
            self.column = len(text) - last_newline - 1 if last_newline >= 0 else self.column + len(text)


# ------------------------------------------------------------------------------------------------ the conversation


class MessageTooLong(ValueError):
    """The new message alone (with the system prompt) does not fit in the context."""


@dataclasses.dataclass
class Reply:
    answer: str
    thinking: str | None
    tokens: list            # generated ids, the stop token included
    finish_reason: str      # "stop" (the end token), "length" (max_new_tokens) or "interrupted"


class Chat:
    """A conversation with a model: history, sampling settings, and one streamed reply per user message."""

    def __init__(self, model, tokenizer, sampling: sample.Sampling, max_new_tokens: int, system: str | None = None,
                 seed: int = 0, notice=None):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.max_len = model.spec.max_len
        if not 0 < max_new_tokens < self.max_len:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be in [1, max_len={self.max_len})")
        self.max_new_tokens = max_new_tokens
        self.system = system
        self.turns: list[tuple[dict, dict]] = []   # (user message, assistant message), oldest first
        self.key = jax.random.key(seed)
        self.replies = 0                           # folded into the key: every reply samples afresh, reproducibly
        self.notice = notice or (lambda text: print(text, file=sys.stderr, flush=True))
        self.end_id = tokenizer.token_id(template.ASSISTANT_END)
        # End of text ends an answer too: a base model writes it where a chat model ends its turn.
        self.stop_ids = (self.end_id, tokenizer.eot_id)

    @property
    def prompt_budget(self) -> int:
        """Tokens the prompt may take: the context less the room kept for the answer."""
        return self.max_len - self.max_new_tokens

    def prompt_ids(self, user_text: str) -> list[int]:
        """The rendered conversation + the new message, ready for the answer; drops the oldest turns (for good,
        with a notice) while it does not fit; MessageTooLong if the message alone does not."""
        user = {"role": "user", "content": user_text}
        dropped = 0
        while True:
            ids = template.render_for_completion(self.tokenizer, self._messages(self.turns[dropped:], user))
            if len(ids) <= self.prompt_budget:
                break
            if dropped == len(self.turns):
                raise MessageTooLong(
                    f"message too long: {len(ids)} tokens with the chat template, but the context holds "
                    f"{self.prompt_budget} (max_len {self.max_len} - max_new_tokens {self.max_new_tokens} kept for "
                    f"the answer); not sent")
            dropped += 1
        if dropped:
            self.turns = self.turns[dropped:]
            self.notice(f"[context full: dropped the oldest {dropped} turn(s); {len(self.turns)} kept]")
        return ids

    def _messages(self, turns, user) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [m for turn in turns for m in turn] + [user]

    def reply(self, user_text: str, out, styled: bool = False) -> Reply:
        """Streams the answer to `user_text` into `out` and adds the turn to the history (MessageTooLong: nothing
        happens). Ctrl-C stops it: the partial answer is shown but not kept."""
        ids = self.prompt_ids(user_text)
        key = jax.random.fold_in(self.key, self.replies)
        self.replies += 1
        writer = AnswerWriter(self.tokenizer, out, styled, hidden_ids=self.stop_ids)
        tokens, finish = [], "length"
        try:
            for step in sample.stream(self.model, [ids], key, self.max_new_tokens, self.sampling,
                                      stop_ids=self.stop_ids, vocab_size=self.tokenizer.n_vocab):
                token = int(step.tokens[0])
                tokens.append(token)
                writer.feed(token)
                if step.stopped[0]:
                    finish = "stop"
                    break
        except KeyboardInterrupt:
            finish = "interrupted"
        writer.close()
        parsed = template.parse_completion(self.tokenizer, [t for t in tokens if t not in self.stop_ids])
        reply = Reply(parsed.answer, parsed.thinking, tokens, finish)
        if finish == "interrupted":
            self.notice("[interrupted: this answer is not kept]")
            return reply
        if finish == "length":
            self.notice(f"[stopped at the length limit: max_new_tokens={self.max_new_tokens}]")
        assistant = {"role": "assistant", "content": reply.answer}
        if reply.thinking is not None:
            assistant["thinking"] = reply.thinking
        self.turns.append(({"role": "user", "content": user_text}, assistant))
        return reply

    def command(self, line: str) -> bool:
        """Runs a /command; False when it asks to quit."""
        name, _, argument = line.strip().partition(" ")
        argument = argument.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.turns = []
            self.notice("[conversation cleared]")
        elif name == "/temperature":
            self._set_temperature(argument)
        elif name == "/system":
            self.system = argument or None
            self.notice(f"[system prompt: {argument!r}]" if argument else "[system prompt removed]")
        elif name == "/help":
            self.notice(HELP)
        else:
            self.notice(f"[unknown command {name}; /help lists them]")
        return True

    def _set_temperature(self, argument: str) -> None:
        try:
            self.sampling = dataclasses.replace(self.sampling, temperature=float(argument))
        except ValueError as error:
            self.notice(f"[/temperature needs a number >= 0, got {argument!r}: {error}]")
            return
        self.notice(f"[temperature {self.sampling.temperature:g}{' (greedy)' if self.sampling.greedy else ''}]")


# ------------------------------------------------------------------------------------------------ CLI

FLAGS = flags.FLAGS


def define_flags():
    """Flags exist only when run as a program, so importing this module never clashes with another's flags."""
    flags.DEFINE_string("workdir", None, "A workdir holding stage runs (grpo/, ppo/, sft/) or a run directory.",
                        required=True)
    flags.DEFINE_string("run", None, "Which run: a stage name (grpo, ppo, sft, base) or a path. Default: the newest "
                        "chat-tuned stage that has checkpoints (grpo, ppo, sft), else the base model.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("message", None, "Answer this one message and exit (no interactive session).")
    flags.DEFINE_string("system", None, "System prompt.")
    sample.define_sampling_flags("min(512, max_len / 2) per answer")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # a chat screen, not a log: loading chatter stays out of it
    path, stage = find_chat_run(FLAGS.workdir, FLAGS.run)
    if stage == BASE:
        logging.warning("%s is the base model, not chat-tuned: it continues text and rarely ends its turn "
                        "(train sft first, or pick a run with --run)", path)
    model, tokenizer, config, meta = checkpoint.load_run(path, step=FLAGS.step)
    sampling = sample.sampling_from_flags(config)
    max_new_tokens = FLAGS.max_new_tokens or min(512, model.spec.max_len // 2)
    session = Chat(model, tokenizer, sampling, max_new_tokens, system=FLAGS.system, seed=FLAGS.seed)
    styled = sys.stdout.isatty()
    if FLAGS.message is not None:
        try:
            session.reply(FLAGS.message, sys.stdout, styled)
        except MessageTooLong as error:
            session.notice(f"[{error}]")
            sys.exit(1)
        return
    session.notice(f"[{stage} model {path} step {meta.get('step')}, context {model.spec.max_len} tokens, "
                   f"{sampling}; /help for commands]")
    interact(session, styled)


def interact(session: Chat, styled: bool) -> None:
    """The read-answer loop on stdin / stdout until /quit or end of input."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line.strip():
            continue
        if line.startswith("/"):
            if not session.command(line):
                return
            continue
        try:
            session.reply(line, sys.stdout, styled)
        except MessageTooLong as error:
            session.notice(f"[{error}]")


if __name__ == "__main__":
    define_flags()
    app.run(main)
