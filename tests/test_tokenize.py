"""lm.data.tokenize on real FineWeb documents: shard round trip, ids equal tiktoken's, byte-identical re-runs,
rejected input counted with file and line; real conversations as token + loss-mask shards whose mask stream is
render_conversation's loss_mask, long ones counted, unlearnable ones dropped and counted."""
import gzip
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from lm import tokenizer as lm_tokenizer
from lm.data import conversations, tokenize
from lm.tokenizer import chat
from tests.test_chat_template import AE, AS, BOS, UE, US, b, bpe_tokenizer, byte_tokenizer

FINEWEB = "web/text/fineweb_sample10BT_2400docs.jsonl.gz"
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")


def fineweb_texts(shared_data, n):
    with gzip.open(shared_data(FINEWEB), "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


def write_jsonl_gz(path, texts):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    return path


@pytest.fixture(scope="module")
def cl100k():
    from tests.conftest import shared_path
    return lm_tokenizer.load(shared_path("tokenizers/cl100k_base.tiktoken"))


@pytest.fixture
def corpus(tmp_path, shared_data):
    """80 real documents in one file, and a second file with bad lines among good ones, and a corrupt .gz file."""
    texts = fineweb_texts(shared_data, 80)
    good = write_jsonl_gz(tmp_path / "a.jsonl.gz", texts[:75])
    bad = tmp_path / "b.jsonl"
    lines = [json.dumps({"text": texts[75]}),        # 1 ok
             '{"text": "unterminated',               # 2 malformed JSON
             json.dumps({"id": 7}),                  # 3 no text
             json.dumps({"text": 5}),                # 4 text not a string
             json.dumps({"text": ""}),               # 5 empty
             "",                                     # blank line: not a document
             json.dumps({"text": texts[76]}),        # 7 ok
             '{"text": "lone \\ud800 surrogate"}']   # 8 ok, U+FFFD replaces the surrogate
    bad.write_text("\n".join(lines) + "\n")
    broken = tmp_path / "c.jsonl.gz"
    broken.write_bytes(b"this is not gzip data")
    expected = texts[:75] + [texts[75], texts[76], "lone \ufffd surrogate"]
    return [str(good), str(bad), str(broken)], expected


def read_split(tokens_dir, index, split):
    """The split's documents (token arrays, end-of-text removed), read with numpy alone."""
    dtype = np.dtype(index["dtype"])
    docs = []
    for shard in index["splits"][split]["shards"]:
        tokens = np.fromfile(tokens_dir / shard["tokens_file"], dtype)
        starts = np.fromfile(tokens_dir / shard["docs_file"], np.uint64).astype(np.int64)
        assert len(tokens) == shard["tokens"] and len(starts) == shard["documents"]
        ends = np.append(starts[1:], len(tokens))
        assert np.all(tokens[ends - 1] == index["tokenizer"]["eot_id"])   # each document ends with end-of-text
        docs.extend(tokens[s:e - 1] for s, e in zip(starts, ends))
    return docs


def test_shards_round_trip_and_rejects_counted(tmp_path, corpus, cl100k, shared_data):
    inputs, expected = corpus
    tokens_dir = tmp_path / "tokens"
    index = tokenize.run(cl100k, inputs, tokens_dir, dict(val_fraction=0.2, shard_tokens=20_000, workers=2))
    assert index == {**tokenize.read_index(tokens_dir), "seconds": index["seconds"], "mb_per_s": index["mb_per_s"]}
    assert index["dtype"] == "uint32" and index["tokenizer"]["hash"] == cl100k.hash
    assert "loss_mask" not in index and not list(tokens_dir.rglob("*.mask.bin"))   # pretraining: no mask stream

    # documents in = tokenized + rejected, and each rejection names its file and line
    assert index["documents"] == {"in": 83, "tokenized": 78, "rejected": 5, "utf8_replaced": 1}
    rejected = {(pathlib.Path(r["file"]).name, r["line"]): r["reason"] for r in index["rejected"]}
    assert sorted(rejected) == [("b.jsonl", 2), ("b.jsonl", 3), ("b.jsonl", 4), ("b.jsonl", 5), ("c.jsonl.gz", 0)]
    assert "unreadable" in rejected[("c.jsonl.gz", 0)]
    assert [s["documents"] for s in index["sources"]] == [75, 3]

    # decode(shards) gives the documents back, split by the documented rule, in order
    split_of = ["val" if tokenize.is_val(t.encode(), 0.2) else "train" for t in expected]
    for split in ("train", "val"):
        docs = read_split(tokens_dir, index, split)
        texts = [t for t, s in zip(expected, split_of) if s == split]
        assert len(docs) == len(texts) == index["splits"][split]["documents"] > 0
        assert [cl100k.decode(d.tolist()) for d in docs] == texts
        assert len(index["splits"][split]["shards"]) >= (2 if split == "train" else 1)

    # ids equal tiktoken's own cl100k_base encoding (independent of lm.tokenizer)
    ranks = load_tiktoken_bpe(str(shared_data("tokenizers/cl100k_base.tiktoken")))
    reference = tiktoken.Encoding("cl100k_base", pat_str=CL100K_PATTERN, mergeable_ranks=ranks,
                                  special_tokens={"<|endoftext|>": 100257})
    train_texts = [t for t, s in zip(expected, split_of) if s == "train"]
    for doc, text in zip(read_split(tokens_dir, index, "train"), train_texts):
        assert doc.tolist() == reference.encode_ordinary(text)


def test_rerun_is_byte_identical_whatever_the_workers(tmp_path, corpus, cl100k):
    inputs, _ = corpus
    first, second = tmp_path / "one", tmp_path / "two"
    tokenize.run(cl100k, inputs, first, dict(shard_tokens=15_000, workers=1))
    (second / "train").mkdir(parents=True)
    (second / "train" / "99999.bin").write_bytes(b"stale")   # a previous run's leftovers are removed
    tokenize.run(cl100k, inputs, second, dict(shard_tokens=15_000, workers=2))
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert len(files) > 6
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_small_vocabulary_gives_uint16(tmp_path, shared_data):
    gpt2 = lm_tokenizer.load(shared_data("tokenizers/gpt2"))
    texts = fineweb_texts(shared_data, 10)
    path = write_jsonl_gz(tmp_path / "docs.jsonl.gz", texts)
    index = tokenize.run(gpt2, [str(path)], tmp_path / "tokens", dict(val_fraction=0.0))
    assert index["dtype"] == "uint16" and index["tokenizer"]["eot_id"] == 50256
    assert index["splits"]["val"] == {"tokens": 0, "documents": 0, "shards": []}
    docs = read_split(tmp_path / "tokens", index, "train")
    assert [gpt2.decode(d.tolist()) for d in docs] == texts


def test_cli(tmp_path, shared_data):
    texts = fineweb_texts(shared_data, 5)
    (tmp_path / "text").mkdir()
    write_jsonl_gz(tmp_path / "text" / "00000.jsonl.gz", texts)
    repo = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "lm.data.tokenize", f"--config={repo / 'configs' / 'tiny.py'}",
         f"--workdir={tmp_path}", f"--tokenizer={shared_data('tokenizers/gpt2')}"],
        cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "5 documents in: 5 tokenized, 0 rejected" in result.stdout
    assert tokenize.read_index(tmp_path / "tokens")["documents"]["tokenized"] == 5


def test_no_documents_is_an_error_naming_the_inputs(tmp_path, shared_data):
    gpt2 = lm_tokenizer.load(shared_data("tokenizers/gpt2"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "weights.txt").write_bytes(bytes(range(256)) * 64)       # binary data under a text name
    with pytest.raises(ValueError, match=r"no documents to tokenize in .*empty.jsonl.*binary_file: 1"):
        tokenize.run(gpt2, [str(tmp_path / "empty.jsonl"), str(tmp_path / "weights.txt")], tmp_path / "tokens")
    assert not (tmp_path / "tokens" / tokenize.INDEX_FILE).exists()      # nothing that looks like a finished run
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "00000.jsonl.gz").write_bytes(gzip.compress(b""))
    repo = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "lm.data.tokenize", f"--config={repo / 'configs' / 'tiny.py'}",
         f"--workdir={tmp_path}", f"--tokenizer={shared_data('tokenizers/gpt2')}"],
        cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "no documents to tokenize in" in result.stderr
    assert str(tmp_path / "text" / "*.jsonl.gz") in result.stderr


def test_a_small_corpus_still_gets_a_usable_val_split(tmp_path, shared_data):
    """Documents the hash rule sends to train: the last one moves to val, which then has a window to evaluate."""
    from lm.data import pipeline
    gpt2 = lm_tokenizer.load(shared_data("tokenizers/gpt2"))
    texts = [t for t in fineweb_texts(shared_data, 40) if not tokenize.is_val(t.encode(), 0.05)][:3]
    path = write_jsonl_gz(tmp_path / "small.jsonl.gz", texts)
    index = tokenize.run(gpt2, [str(path)], tmp_path / "tokens", dict(val_fraction=0.05))
    assert index["splits"]["train"]["documents"] == 2 and index["splits"]["val"]["documents"] == 1
    assert index["split"]["moved"] == dict(document=f"{path}:3", moved_from="train", moved_to="val")
    assert index["split"]["val_usable"] and tokenize.has_val(index)
    assert [gpt2.decode(d.tolist()) for d in read_split(tmp_path / "tokens", index, "val")] == texts[2:]
    assert [gpt2.decode(d.tolist()) for d in read_split(tmp_path / "tokens", index, "train")] == texts[:2]
    val = pipeline.Windows(pipeline.TokenData(tmp_path / "tokens", "val"), seq_len=64, keep_tail=True)
    assert val.n >= 1 and pipeline.val_batch(val, 0, 2)["loss_mask"].sum() > 0

    # one document cannot be split: the index says so and training can skip evaluation
    one = write_jsonl_gz(tmp_path / "one.jsonl.gz", texts[:1])
    index = tokenize.run(gpt2, [str(one)], tmp_path / "one", dict(val_fraction=0.05))
    assert index["splits"]["train"]["documents"] == 1 and not index["split"]["val_usable"]
    assert not tokenize.has_val(tokenize.read_index(tmp_path / "one"))
    assert pipeline.unigram_loss(tmp_path / "one") is None and pipeline.unigram_loss(tmp_path / "tokens") > 0


def test_text_files_are_split_into_documents(tmp_path, shared_data):
    gpt2 = lm_tokenizer.load(shared_data("tokenizers/gpt2"))
    texts = fineweb_texts(shared_data, 30)
    (tmp_path / "book.txt").write_text("\n\n".join(texts))
    index = tokenize.run(gpt2, [str(tmp_path / "book.txt")], tmp_path / "tokens",
                         dict(val_fraction=0.0, txt_max_chars=4000))
    docs = [gpt2.decode(d.tolist()) for d in read_split(tmp_path / "tokens", index, "train")]
    assert len(docs) >= len("\n\n".join(texts)) // 4000 and all(len(d) <= 4000 or "\n" not in d.strip() for d in docs)
    assert "".join(docs).replace("\n", "") == "".join(texts).replace("\n", "")


def read_conversation_split(tokens_dir, index, split):
    """[(ids, mask)] of each conversation of a split, read with numpy alone."""
    out = []
    for shard in index["splits"][split]["shards"]:
        tokens = np.fromfile(tokens_dir / shard["tokens_file"], index["dtype"]).astype(np.int64)
        mask = np.fromfile(tokens_dir / shard["mask_file"], np.uint8)
        starts = np.fromfile(tokens_dir / shard["docs_file"], np.uint64).astype(np.int64)
        assert len(mask) == len(tokens) == shard["tokens"] and len(starts) == shard["documents"]
        ends = np.append(starts[1:], len(tokens))
        out += [(tokens[s:e].tolist(), mask[s:e].tolist()) for s, e in zip(starts, ends)]
    return out


SFT_FILES = ("nanochat_identity_conversations.jsonl", "fastchat_dummy_conversation.json",
             "self_instruct_seed_tasks.jsonl")


def test_real_conversations_become_shards_whose_mask_stream_is_the_loss_mask(tmp_path, shared_data):
    tok = bpe_tokenizer()
    found, _ = conversations.load_conversations([str(shared_data(f"posttrain/sft/{n}")) for n in SFT_FILES])
    held = [c for i, c in enumerate(found) if i % 10 == 0]
    train = [c for i, c in enumerate(found) if i % 10]
    index = tokenize.write_conversations(tok, {"train": train, "identity": held}, tmp_path / "sft", seq_len=4096,
                                         shard_tokens=100_000)
    assert index == tokenize.read_index(tmp_path / "sft")
    assert index["loss_mask"] is True and index["pad_id"] == chat.pad_id(tok) and index["dtype"] == "uint16"
    assert len(index["splits"]["train"]["shards"]) > 2
    for split, convs in (("train", train), ("identity", held)):
        got = read_conversation_split(tmp_path / "sft", index, split)
        assert len(got) == len(convs) == index["conversations"][split]["rows"]
        for (ids, mask), conversation in zip(got, convs):
            assert (ids, mask) == tuple(chat.render_conversation(tok, conversation.messages))   # whole, in order
        counts = index["conversations"][split]
        assert counts["supervised_tokens"] == sum(sum(m[1:]) for _, m in got) > 0
        assert counts["tokens"] == sum(len(i) for i, _ in got) and counts["truncated"] == 0
    again = tokenize.write_conversations(tok, {"train": train[:5]}, tmp_path / "sft", seq_len=4096)
    assert sorted(p.name for p in (tmp_path / "sft").iterdir()) == ["index.json", "train"]   # old splits removed
    assert again["conversations"]["train"]["rows"] == 5


def test_long_conversations_counted_and_unlearnable_ones_dropped_with_where(tmp_path):
    hi = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    long = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * 50}]
    long_prompt = [{"role": "user", "content": "q" * 50}, {"role": "assistant", "content": "a"}]
    index = tokenize.write_conversations(byte_tokenizer(), {"train": [long, long_prompt, hi]}, tmp_path, seq_len=16)
    counts = index["conversations"]["train"]
    assert counts["conversations"] == 3 and counts["rows"] == 2 and counts["truncated"] == 2
    assert counts["dropped_no_supervised_token"] == 1 and counts["dropped"] == ["train conversation 1"]
    assert counts["tokens"] == 17 + 12 and counts["supervised_tokens"] == 12 + 6
    assert counts["supervised_tokens_before_cut"] == 51 + 2 + 6
    (long_ids, long_mask), (hi_ids, hi_mask) = read_conversation_split(tmp_path, index, "train")
    assert long_ids == [BOS, US, *b("q"), UE, AS, *b("x" * 50), AE]   # kept whole: the pipeline cuts the row
    assert long_mask == [0] * 5 + [1] * 51
    assert hi_ids == [BOS, US, *b("hi"), UE, AS, *b("hello"), AE] and hi_mask == [0] * 6 + [1] * 6


def test_a_bad_conversation_is_an_error_naming_it(tmp_path):
    hi = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(chat.ConversationError, match="train conversation 1: no assistant turn"):
        tokenize.write_conversations(byte_tokenizer(), {"train": [hi, hi[:1]]}, tmp_path, seq_len=16)
    assert not (tmp_path / tokenize.INDEX_FILE).exists()
