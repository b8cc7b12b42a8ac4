"""lm.data.pipeline on a real tokenized corpus: exact resume, per-process rows, windows inside the stream, each window
once per epoch, document packing, validation covering its split once, and tfds.load of the corpus; on real
conversations (token + loss-mask shards): one whole conversation per row from its first token, padded with <|pad|>
at loss 0, the mask stream as the loss mask, exact resume, held-out splits read once."""
import gzip
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from lm.data import pipeline, tokenize
from lm.tokenizer import chat

REPO = pathlib.Path(__file__).resolve().parents[1]
SEQ_LEN = 64
BATCH = 8
SEED = 1234


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory):
    """300 FineWeb documents (~2 MB) tokenized with cl100k_base into shards of ~50k tokens."""
    from lm import tokenizer as lm_tokenizer
    from tests.conftest import shared_path
    tok = lm_tokenizer.load(shared_path("tokenizers/cl100k_base.tiktoken"))
    root = tmp_path_factory.mktemp("pipeline")
    with gzip.open(shared_path("web/text/fineweb_sample10BT_2400docs.jsonl.gz"), "rt", encoding="utf-8") as f:
        lines = [line for _, line in zip(range(300), f)]
    with gzip.open(root / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(lines)
    tokenize.run(tok, [str(root / "docs.jsonl.gz")], root / "tokens", dict(val_fraction=0.1, shard_tokens=50_000))
    return root / "tokens"


def stream(tokens_dir, split):
    """The split's token stream, read with numpy alone (not through TokenData)."""
    index = tokenize.read_index(tokens_dir)
    return np.concatenate([np.fromfile(tokens_dir / s["tokens_file"], index["dtype"])
                           for s in index["splits"][split]["shards"]]).astype(np.int64)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def reference_feistel(x: int, n: int, keys) -> int:
    """The permutation written plainly with Python ints, as an independent check of the vectorised one."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask, m64 = (1 << half) - 1, (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
        return z ^ (z >> 31)

    while True:
        left, right = x >> half, x & mask
        for key in keys:
            left, right = right, left ^ (mix(right ^ int(key)) & mask)
        x = (left << half) | right
        if x < n:
            return x


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4097, 65536, 100_003])
def test_feistel_is_a_permutation_and_matches_reference(n):
    keys = pipeline.round_keys(SEED, 3)
    permuted = pipeline.feistel_permute(np.arange(n), n, keys)
    assert np.array_equal(np.sort(permuted), np.arange(n))
    sample = np.unique(np.linspace(0, n - 1, 50).astype(np.int64))
    assert [reference_feistel(int(x), n, keys) for x in sample] == permuted[sample].tolist()
    if n >= 1000:   # a different seed or epoch gives a different order, far from the identity
        assert not np.array_equal(permuted, pipeline.feistel_permute(np.arange(n), n, pipeline.round_keys(SEED, 4)))
        assert np.mean(permuted == np.arange(n)) < 0.01


def test_resume_at_step_100_equals_uninterrupted_run(tokens_dir):
    uninterrupted = take(pipeline.train_batches(tokens_dir, SEQ_LEN, BATCH, SEED, process_index=0, process_count=1),
                         111)[100:]
    resumed = take(pipeline.train_batches(tokens_dir, SEQ_LEN, BATCH, SEED, start_step=100, process_index=0,
                                          process_count=1), 11)
    for a, b in zip(uninterrupted, resumed):
        assert a.keys() == b.keys() == {"inputs", "targets", "loss_mask"}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert resumed[0]["inputs"].shape == (BATCH, SEQ_LEN) and resumed[0]["inputs"].dtype == np.int32
    assert resumed[0]["loss_mask"].dtype == np.float32 and resumed[0]["loss_mask"].min() == 1.0
    other_seed = next(pipeline.train_batches(tokens_dir, SEQ_LEN, BATCH, SEED + 1, start_step=100, process_index=0,
                                             process_count=1))
    assert not np.array_equal(other_seed["inputs"], resumed[0]["inputs"])


def test_two_processes_split_the_global_batch(tokens_dir):
    def batches(index, count):
        return take(pipeline.train_batches(tokens_dir, SEQ_LEN, BATCH, SEED, start_step=7, process_index=index,
                                           process_count=count), 3)
    whole, first, second = batches(0, 1), batches(0, 2), batches(1, 2)
    for w, a, b in zip(whole, first, second):
        assert a["inputs"].shape == b["inputs"].shape == (BATCH // 2, SEQ_LEN)
        for key in w:
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), w[key])
        rows_a, rows_b = {r.tobytes() for r in a["inputs"]}, {r.tobytes() for r in b["inputs"]}
        assert not rows_a & rows_b
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.train_batches(tokens_dir, SEQ_LEN, 7, SEED, process_index=0, process_count=2)


def test_windows_come_from_the_stream_and_each_is_used_once_per_epoch(tokens_dir):
    tokens = stream(tokens_dir, "train")
    windows = pipeline.Windows(pipeline.TokenData(tokens_dir, "train"), SEQ_LEN)
    assert windows.data.masks is None   # pretraining shards have no mask stream: every target is learnt
    n = windows.n
    assert n == (len(tokens) - 1) // SEQ_LEN and windows.data.n_tokens == len(tokens)
    by_content = {}
    for k in range(n):
        by_content.setdefault(tokens[k * SEQ_LEN:(k + 1) * SEQ_LEN + 1].tobytes(), []).append(k)
    steps = -(-2 * n // BATCH)   # two epochs and a bit
    seen = []
    for step in range(steps):
        batch = pipeline.train_batch(windows, step, BATCH, SEED)
        rows = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1).astype(np.int64)
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        for row, k in zip(rows, pipeline.train_window_ids(step, n, BATCH, SEED, np.arange(BATCH))):
            assert k in by_content.get(row.tobytes(), ())   # the row is window k of the stream
            seen.append(k)
    first, second = np.array(seen[:n]), np.array(seen[n:2 * n])
    assert np.array_equal(np.sort(first), np.arange(n)) and np.array_equal(np.sort(second), np.arange(n))
    assert not np.array_equal(first, second)


def test_document_packing(tokens_dir):
    seq_len = 512   # longer than some documents and shorter than others
    tokens = stream(tokens_dir, "train")
    eot = tokenize.read_index(tokens_dir)["tokenizer"]["eot_id"]
    starts = np.concatenate([[0], np.flatnonzero(tokens == eot)[:-1] + 1])   # from the stream, not the index
    windows = pipeline.Windows(pipeline.TokenData(tokens_dir, "train"), seq_len, packing="document")
    assert windows.n == len(starts)
    seen = []
    for step in range(-(-windows.n // BATCH)):
        batch = pipeline.train_batch(windows, step, BATCH, SEED)
        ids = pipeline.train_window_ids(step, windows.n, BATCH, SEED, np.arange(BATCH))
        for row, doc in enumerate(ids):
            end = np.flatnonzero(tokens[starts[doc]:] == eot)[0] + starts[doc] + 1   # one past the document's eot
            length = min(end - starts[doc], seq_len + 1)
            real = tokens[starts[doc]:starts[doc] + length]
            np.testing.assert_array_equal(batch["inputs"][row, :length - 1], real[:-1])
            np.testing.assert_array_equal(batch["targets"][row, :length - 1], real[1:])
            # padding: the end-of-text id, and the mask is 1 exactly on the document's own targets
            assert np.all(batch["inputs"][row, length - 1:] == eot)
            assert np.all(batch["targets"][row, length - 1:] == eot)
            np.testing.assert_array_equal(batch["loss_mask"][row], np.arange(seq_len) < length - 1)
            seen.append(doc)
    assert np.array_equal(np.sort(seen[:windows.n]), np.arange(windows.n))
    lengths = np.diff(np.append(starts, len(tokens)))
    assert lengths.min() < seq_len < lengths.max()   # both padding and truncation happened
    shortest = int(np.argmin(lengths))
    padded = pipeline.Windows(windows.data, seq_len, packing="document", pad_id=7).batch(np.array([shortest]))
    assert np.all(padded["inputs"][0, lengths[shortest]:] == 7) and padded["inputs"][0, lengths[shortest] - 1] == eot


@pytest.mark.parametrize("packing", ["concat", "document"])
def test_validation_covers_the_split_once(tokens_dir, packing):
    tokens = stream(tokens_dir, "val")
    batch_size = 6
    single = list(pipeline.val_batches(tokens_dir, SEQ_LEN, batch_size, 0, 1, packing=packing))
    halves = [list(pipeline.val_batches(tokens_dir, SEQ_LEN, batch_size, i, 2, packing=packing)) for i in (0, 1)]
    assert len(single) == len(halves[0]) == len(halves[1]) > 1
    for whole, a, b in zip(single, *halves):
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), whole[key])
    mask = np.concatenate([b["loss_mask"] for b in single]).astype(bool)
    targets = np.concatenate([b["targets"] for b in single])[mask]
    inputs = np.concatenate([b["inputs"] for b in single])[mask]
    if packing == "concat":   # every target token of the stream exactly once, in order
        np.testing.assert_array_equal(targets, tokens[1:])
        np.testing.assert_array_equal(inputs, tokens[:-1])
    else:
        eot = tokenize.read_index(tokens_dir)["tokenizer"]["eot_id"]
        docs = np.split(tokens, np.flatnonzero(tokens == eot)[:-1] + 1)
        assert sum(1 for b in single for m in b["loss_mask"] if m.any()) == len(docs)
        expected = np.concatenate([d[1:SEQ_LEN + 1] for d in docs])
        np.testing.assert_array_equal(targets, expected)
    assert not single[-1]["loss_mask"][-1].any()   # the last batch is padded with masked rows


def test_clear_errors(tokens_dir, tmp_path):
    with pytest.raises(ValueError, match="no window"):
        pipeline.Windows(pipeline.TokenData(tokens_dir, "val"), 10**9)
    with pytest.raises(ValueError, match="packing"):
        pipeline.Windows(pipeline.TokenData(tokens_dir, "train"), SEQ_LEN, packing="bogus")
    with pytest.raises(FileNotFoundError, match="lm.data.tokenize"):
        pipeline.TokenData(tmp_path, "train")
    index = tokenize.read_index(tokens_dir)
    shard = tokens_dir / index["splits"]["train"]["shards"][0]["tokens_file"]
    copy = tmp_path / "tokens"
    copy.mkdir()
    (copy / "index.json").write_text(json.dumps(index))
    (copy / "train").mkdir()
    (copy / index["splits"]["train"]["shards"][0]["tokens_file"]).write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(ValueError, match="00000.bin: expected"):
        pipeline.TokenData(copy, "train")


def test_tfds_load_offline(tokens_dir, tmp_path):
    from lm.data import tfds_builder
    tokens = stream(tokens_dir, "val")
    eot = tokenize.read_index(tokens_dir)["tokenizer"]["eot_id"]
    docs = np.split(tokens, np.flatnonzero(tokens == eot) + 1)[:-1]
    examples = list(tfds_builder.load(tokens_dir, "validation", data_dir=tmp_path).as_numpy_iterator())
    assert [e["document"] for e in examples] == list(range(len(docs)))
    for example, doc in zip(examples, docs):
        np.testing.assert_array_equal(example["tokens"], doc[:-1])


# --- conversations (SFT) -------------------------------------------------------------------------------------------

CONV_SEQ_LEN = 1536   # (1024-token BPE) longer than some identity conversations, shorter than others


@pytest.fixture(scope="module")
def conversation_dir(tmp_path_factory):
    """nanochat's 1000 identity conversations, every 8th held out, as shards of ~200k tokens (the 1024-token BPE)."""
    from lm.data import conversations
    from tests.conftest import shared_path
    from tests.test_chat_template import bpe_tokenizer
    found, _ = conversations.load_conversations(shared_path("posttrain/sft/nanochat_identity_conversations.jsonl"))
    splits = {"train": [c for i, c in enumerate(found) if i % 8], "held": found[::8]}
    tok = bpe_tokenizer()
    directory = tmp_path_factory.mktemp("conversations") / "sft"
    tokenize.write_conversations(tok, splits, directory, CONV_SEQ_LEN, shard_tokens=200_000)
    rendered = {name: [chat.render_conversation(tok, c.messages) for c in convs] for name, convs in splits.items()}
    return directory, tok, rendered


def full_rows(batch):
    return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def expected_row(ids, mask, seq_len, pad):
    """The row of one conversation, built here from render_conversation alone: its first seq_len + 1 ids then pad;
    the loss of target t is the mask of token t + 1."""
    n = min(len(ids), seq_len + 1)
    return ids[:n] + [pad] * (seq_len + 1 - n), mask[1:n] + [0] * (seq_len + 1 - n)



def test_conversations_are_whole_rows_from_their_first_token_padded_at_loss_0(conversation_dir):
    directory, tok, rendered = conversation_dir
    convs = rendered["train"]
    pad, begin = chat.pad_id(tok), tok.token_id(chat.BEGIN)
    assert pad not in {tok.token_id(t) for t in (chat.ASSISTANT_END, chat.USER_END, chat.SYSTEM_END, chat.BEGIN)}
    windows = pipeline.Windows(pipeline.TokenData(directory, "train"), CONV_SEQ_LEN, packing="document")
    assert windows.n == len(convs) and windows.pad_id == pad and len(windows.data.shards) > 2
    seen = []
    for step in range(-(-windows.n // BATCH)):
        batch = pipeline.train_batch(windows, step, BATCH, SEED)
        ids = pipeline.train_window_ids(step, windows.n, BATCH, SEED, np.arange(BATCH))
        for row, mask, k in zip(full_rows(batch), batch["loss_mask"], ids):
            want_ids, want_mask = expected_row(*convs[k], CONV_SEQ_LEN, pad)
            assert row.tolist() == want_ids and mask.tolist() == want_mask
            assert (row == begin).sum() == 1 and row[0] == begin   # one conversation, from its first token
            assert mask[row[1:] == pad].sum() == 0                 # padding is never learnt
            seen.append(k)
    assert sorted(seen[:windows.n]) == list(range(windows.n))      # each conversation once per epoch
    lengths = [len(ids) for ids, _ in convs]
    assert min(lengths) < CONV_SEQ_LEN + 1 < max(lengths)          # both cut and padded rows were checked


def test_conversation_batches_resume_exactly_and_split_over_processes(conversation_dir):
    directory, _, _ = conversation_dir

    def batches(start, n, index=0, count=1):
        return take(pipeline.train_batches(directory, CONV_SEQ_LEN, BATCH, SEED, start_step=start, packing="document",
                                           process_index=index, process_count=count), n)
    uninterrupted = batches(0, 130)[120:]   # past the first epoch (875 conversations, 8 a step)
    for a, b in zip(uninterrupted, batches(120, 10)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    halves = [batches(125, 1, i, 2)[0] for i in (0, 1)]
    for key in halves[0]:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), uninterrupted[5][key])
    assert 0 < uninterrupted[0]["loss_mask"].mean() < 1


def test_held_out_conversations_are_each_read_once(conversation_dir):
    directory, tok, rendered = conversation_dir
    pad = chat.pad_id(tok)
    batches = list(pipeline.val_batches(directory, CONV_SEQ_LEN, 6, 0, 1, packing="document", split="held"))
    rows = np.concatenate([full_rows(b) for b in batches])
    masks = np.concatenate([b["loss_mask"] for b in batches])
    assert len(rows) == -(-len(rendered["held"]) // 6) * 6
    for i, (ids, mask) in enumerate(rendered["held"]):
        want_ids, want_mask = expected_row(ids, mask, CONV_SEQ_LEN, pad)
        assert rows[i].tolist() == want_ids and masks[i].tolist() == want_mask
    assert not masks[len(rendered["held"]):].any()


# A script that keeps a train iterator alive to its end (its last batches still being made on tf.data's threads).
KEEPS_AN_ITERATOR = """
import sys
from lm.data import pipeline
batches = pipeline.train_batches(sys.argv[1], 64, 8, 0, process_index=0, process_count=1)
for _ in range(50):
    next(batches)
print("done")
"""


def test_a_process_exits_cleanly_with_an_iterator_still_alive(tokens_dir):
    """Before lm.data.pipeline released live iterators at exit, 1 to 3 of 4 such exits hung or aborted ("terminate
    called without an active exception"): tf.data's threads called into a finalizing interpreter."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for _ in range(4):
        out = subprocess.run([sys.executable, "-c", KEEPS_AN_ITERATOR, str(tokens_dir)], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr[-2000:]


def test_a_closed_iterator_stops(tokens_dir):
    batches = pipeline.train_batches(tokens_dir, SEQ_LEN, BATCH, SEED, process_index=0, process_count=1)
    assert next(batches)["inputs"].shape == (BATCH, SEQ_LEN)
    batches.close()
    with pytest.raises(StopIteration):
        next(batches)
