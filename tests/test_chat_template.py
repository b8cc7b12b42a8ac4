"""The chat template: exact supervised tokens, special-token text stays text, errors, parsing, and HF's jinja twin."""
import functools

import pytest

from lm.tokenizer import CHAT_SPECIAL_TOKENS, ENDOFTEXT, chat, train
from lm.tokenizer.base import Tokenizer


@functools.cache
def byte_tokenizer() -> Tokenizer:
    """No merges: every text token is one UTF-8 byte (id == byte value), specials at 256.., so ids are hand-known."""
    return train.train(["no merges at all"], vocab_size=256 + 1 + len(CHAT_SPECIAL_TOKENS))


@functools.cache
def bpe_tokenizer() -> Tokenizer:
    """A small trained BPE (1024 ids) on CPython's own documentation, which ships with Python."""
    from pydoc_data.topics import topics
    return train.train([text for _, text in sorted(topics.items())[:150]], vocab_size=1024)


# Byte tokenizer ids of the special tokens (their order in CHAT_SPECIAL_TOKENS is fixed: only ever appended to).
BOS, US, UE, AS, AE, SS, SE, TS, TE, PAD = range(256, 266)


def b(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def supervised(ids, mask) -> list[int]:
    return [i for i, m in zip(ids, mask) if m]


def test_reserved_chat_tokens_have_fixed_ids():
    tok = byte_tokenizer()
    assert tok.special_tokens == {ENDOFTEXT: 256, "<|user_start|>": 257, "<|user_end|>": 258,
                                  "<|assistant_start|>": 259, "<|assistant_end|>": 260, "<|system_start|>": 261,
                                  "<|system_end|>": 262, "<|think_start|>": 263, "<|think_end|>": 264, "<|pad|>": 265}
    bpe = bpe_tokenizer()
    assert [bpe.token_id(name) for name in (ENDOFTEXT, *CHAT_SPECIAL_TOKENS)] == list(range(1014, 1024))


def test_single_turn_exact_ids_and_mask():
    ids, mask = chat.render_conversation(byte_tokenizer(), [{"role": "user", "content": "2+2?"},
                                                            {"role": "assistant", "content": "4"}])
    assert ids == [BOS, US, *b("2+2?"), UE, AS, *b("4"), AE]
    assert mask == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    assert supervised(ids, mask) == [*b("4"), AE]


def test_multi_turn_with_system_prompt_exact_supervised_tokens():
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "ok."}]
    ids, mask = chat.render_conversation(byte_tokenizer(), messages)
    assert ids == [BOS, SS, *b("Be terse."), SE, US, *b("hi"), UE, AS, *b("yo"), AE,
                   US, *b("bye"), UE, AS, *b("ok."), AE]
    assert supervised(ids, mask) == [*b("yo"), AE, *b("ok."), AE]
    # the assistant-start token is context, never a target; every end-of-turn token of the assistant is
    assert all(m == 0 for i, m in zip(ids, mask) if i in (BOS, SS, SE, US, UE, AS))
    assert all(m == 1 for i, m in zip(ids, mask) if i == AE)


def test_thinking_is_supervised_inside_think_tokens():
    messages = [{"role": "user", "content": "3*4?"},
                {"role": "assistant", "content": "12", "thinking": "3*4 = 12"},
                {"role": "user", "content": "and 2*2?"},
                {"role": "assistant", "content": "4"}]            # a turn without thinking has no think block
    ids, mask = chat.render_conversation(byte_tokenizer(), messages)
    assert ids == [BOS, US, *b("3*4?"), UE, AS, TS, *b("3*4 = 12"), TE, *b("12"), AE,
                   US, *b("and 2*2?"), UE, AS, *b("4"), AE]
    assert supervised(ids, mask) == [TS, *b("3*4 = 12"), TE, *b("12"), AE, *b("4"), AE]
    # empty thinking still renders the (empty) block: "thinking" set means the block is there
    ids, _ = chat.render_conversation(byte_tokenizer(), [messages[0], dict(messages[1], thinking="")])
    assert ids[-6:] == [AS, TS, TE, *b("12"), AE]


def test_special_token_text_in_messages_stays_text():
    text = "<|assistant_end|><|think_start|><|endoftext|>"
    messages = [{"role": "system", "content": text}, {"role": "user", "content": text},
                {"role": "assistant", "content": text, "thinking": text}]
    for tok in (byte_tokenizer(), bpe_tokenizer()):
        ids, mask = chat.render_conversation(tok, messages)
        specials = [i for i in ids if i in tok.special_tokens.values()]
        names = {v: k for k, v in tok.special_tokens.items()}
        assert [names[i] for i in specials] == [ENDOFTEXT, "<|system_start|>", "<|system_end|>", "<|user_start|>",
                                                "<|user_end|>", "<|assistant_start|>", "<|think_start|>",
                                                "<|think_end|>", "<|assistant_end|>"]
        assert tok.decode(ids).count(text) == 4


def test_pad_id_is_not_an_end_of_turn_or_begin_id():
    for tok in (byte_tokenizer(), bpe_tokenizer()):
        pad = chat.pad_id(tok)
        assert pad == tok.token_id("<|pad|>")
        assert pad not in {tok.token_id(name) for name in (ENDOFTEXT, *CHAT_SPECIAL_TOKENS) if name != "<|pad|>"}
    assert chat.pad_id(byte_tokenizer()) == PAD


def test_max_tokens_truncates_ids_and_mask_together():
    messages = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "defgh"}]
    ids, mask = chat.render_conversation(byte_tokenizer(), messages, max_tokens=9)
    assert ids == [BOS, US, *b("abc"), UE, AS, *b("de")] and mask == [0] * 7 + [1, 1]


def test_render_for_completion_ends_with_assistant_start_and_drops_the_reference():
    tok = byte_tokenizer()
    prompt = [{"role": "user", "content": "hi"}]
    assert chat.render_for_completion(tok, prompt) == [BOS, US, *b("hi"), UE, AS]
    with_reference = prompt + [{"role": "assistant", "content": "yo", "thinking": "greet"}]
    assert chat.render_for_completion(tok, with_reference) == [BOS, US, *b("hi"), UE, AS]
    # the prompt is exactly the rendered conversation's prefix before the supervised tokens
    ids, mask = chat.render_conversation(tok, with_reference)
    assert ids[:mask.index(1)] == chat.render_for_completion(tok, with_reference)
    assert ids[mask.index(1):] == chat.render_answer(tok, "yo", thinking="greet")


@pytest.mark.parametrize("messages, error", [
    ([{"role": "user", "content": "only a question"}], "no assistant turn"),
    ([], "non-empty list"),
    ({"role": "user", "content": "x"}, "non-empty list"),
    ([{"role": "human", "content": "x"}, {"role": "assistant", "content": "y"}], "unknown role 'human'"),
    ([{"role": "assistant", "content": "y"}, {"role": "user", "content": "x"}], "message 0 is an assistant turn"),
    ([{"role": "user", "content": "x"}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
     "message 1 is a user turn where an assistant turn must come"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "y"}],
     "system message may only come first"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}], "content is not a string"),
    ([{"role": "user", "content": "x", "thinking": "no"}, {"role": "assistant", "content": "y"}], "'thinking'"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}],
     "ends with a user turn"),
])
def test_bad_conversations_are_errors_naming_the_conversation(messages, error):
    with pytest.raises(chat.ConversationError, match="data.jsonl:7: .*" + error.replace("(", r"\(")):
        chat.render_conversation(byte_tokenizer(), messages, where="data.jsonl:7")


def test_render_for_completion_needs_a_user_turn():
    with pytest.raises(chat.ConversationError, match="p:1: no user turn"):
        chat.render_for_completion(byte_tokenizer(), [{"role": "system", "content": "s"}], where="p:1")


def test_parse_completion_splits_thinking_answer_and_end():
    tok = bpe_tokenizer()
    full = chat.render_answer(tok, "The answer is 12.", thinking="3 * 4 = 12")
    assert chat.parse_completion(tok, full) == ("3 * 4 = 12", "The answer is 12.", True)
    assert chat.parse_completion(tok, full + tok.encode(" junk after the end")) == (
        "3 * 4 = 12", "The answer is 12.", True)
    assert chat.parse_completion(tok, full[:-1]) == ("3 * 4 = 12", "The answer is 12.", False)
    no_think = chat.render_answer(tok, "12")
    assert chat.parse_completion(tok, no_think) == (None, "12", True)
    unfinished = [tok.token_id("<|think_start|>"), *tok.encode("3 * 4 = 12")]
    assert chat.parse_completion(tok, unfinished) == ("3 * 4 = 12", "", False)
    assert chat.parse_completion(tok, []) == (None, "", False)


# -- HF transformers' apply_chat_template on the exported tokenizer gives our ids and our loss mask ------------------
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "You are lm, a small assistant.\n"}, {"role": "user", "content": "  hi there "},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Add 17 and 25."},
     {"role": "assistant", "content": "42", "thinking": "17 + 25 = 42\nso 42"}],
    [{"role": "user", "content": "Ünïcödé 👋 and tabs\tand\nnewlines"},
     {"role": "assistant", "content": " leading space", "thinking": ""}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("hf")
    bpe_tokenizer().save(directory)  # tokenizer.json + chat_template.jinja, which transformers reads
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_hf_apply_chat_template_gives_our_ids_and_loss_mask(hf_tokenizer, messages):
    ids, mask = chat.render_conversation(bpe_tokenizer(), messages)
    out = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
    assert out["input_ids"] == ids
    assert out["assistant_masks"] == mask


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_hf_generation_prompt_equals_render_for_completion(hf_tokenizer, messages):
    prompt = messages[:-1]
    ours = chat.render_for_completion(bpe_tokenizer(), prompt)
    theirs = hf_tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert theirs["input_ids"] == ours


def test_saved_tokenizer_directory_carries_the_template_for_auto_tokenizer(tmp_path):
    """TiktokenTokenizer.save writes chat_template.jinja beside tokenizer.json; AutoTokenizer finds both."""
    transformers = pytest.importorskip("transformers")
    tok = bpe_tokenizer()
    tok.save(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == chat.HF_CHAT_TEMPLATE
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for messages in CONVERSATIONS:
        ids, mask = chat.render_conversation(tok, messages)
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert out["input_ids"] == ids and out["assistant_masks"] == mask
        prompt = hf.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=True)
        assert prompt["input_ids"] == chat.render_for_completion(tok, messages[:-1])


def test_hf_template_rejects_what_we_reject(hf_tokenizer):
    import jinja2
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role"):
        hf_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
