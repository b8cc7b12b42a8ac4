"""Defaults shared by every preset. A preset changes what differs; `model_for_depth` is the one size dial."""
import ml_collections


def model_for_depth(depth: int, family: str = "gpt2", head_dim: int = 64) -> ml_collections.ConfigDict:
    """Width, heads and MLP size derived from depth (nanochat's aspect ratio: d_model = 64 * depth)."""
    d_model = 64 * depth
    n_heads = max(1, d_model // head_dim)
    return ml_collections.ConfigDict(dict(
        family=family,
        vocab_size=0,            # 0: take it from the tokenizer
        n_layers=depth,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_heads if family == "gpt2" else max(1, n_heads // 2),
        d_ff=4 * d_model if family == "gpt2" else _swiglu_width(d_model),
        max_len=1024,
        dtype="bfloat16",        # compute dtype
        param_dtype="float32",
        attention="auto",        # auto (blockwise from 4 blocks on, else xla) | xla | dot_product
                                 # (jax.nn.dot_product_attention: cuDNN on GPU) | blockwise (causal)
        attention_block=128,     # blockwise: queries per block; key blocks wholly after a query block are skipped
        fused_qkv=False,         # one matmul for q, k, v (weights concatenated in the step; parameter paths unchanged)
        flat_matmuls=True,       # projections and MLP as 2-D matmuls over batch * length (CPU: no 3-D dot transposes)
        remat="none",            # none | full | dots
        scan_layers=False,
        rope_theta=10000.0,
        norm_eps=1e-5,
        tie_embeddings=family == "gpt2",
        init_std=0.02,           # residual projections use init_std / sqrt(2 * n_layers)
    ))


def _swiglu_width(d_model: int, multiple: int = 64) -> int:
    width = int(8 * d_model / 3)
    return multiple * ((width + multiple - 1) // multiple)


def _filter_config(preset: str = "bundled") -> ml_collections.ConfigDict:
    """The FineWeb recipe's section (lm/data/filter.py holds its defaults and presets: web, text, bundled)."""
    try:
        from lm.data import filter as data_filter
    except ImportError:  # an image without the data-processing libraries (e.g. a GPU box running only training)
        return ml_collections.ConfigDict({"preset": preset})
    return data_filter.default_config(preset)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.objective = "pretrain"   # what lm.train runs: pretrain | sft | reward | dpo | ppo | grpo (lm/train/<name>.py)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.data = ml_collections.ConfigDict(dict(
        inputs=(),               # empty: the bundled corpus (CPython's documentation)
    ))
    c.filter = _filter_config()
    c.tokenizer = ml_collections.ConfigDict(dict(
        kind="bpe",              # bpe (rustbpe -> tiktoken) | sentencepiece | pretrained: load `name`
        name="",                 # pretrained: cl100k_base, gpt2, a .tiktoken file or a saved directory
        vocab_size=4096,         # total, including the 10 reserved special tokens
        max_chars=0,             # train on at most this many characters of the corpus (0: all)
    ))
    c.dataset = ml_collections.ConfigDict(dict(
        val_fraction=0.05,
        shard_tokens=1 << 24,
        packing="concat",        # concat: windows cross documents | document: each window starts a document
        workers=0,               # 0: all cores
        text_key="text",         # JSON field holding the document text
    ))
    c.model = model_for_depth(12)
    c.train = ml_collections.ConfigDict(dict(
        steps=1000,
        schedule_steps=0,        # lr decay horizon (0: train.steps); fix it to continue a run without stretching
                                 # the decay
        batch_size=32,           # global, in sequences
        seq_len=1024,
        grad_accum=1,
        loss_chunk=0,            # 0: off; N > 0 scores N positions at a time, never building the full float32 logits
        fused_loss=False,        # cross-entropy with its own backward, gradients formed chunk by chunk (losses.py)
        cpu_ynn_fusions=False,   # CPU: XLA's YNNPACK fusions in the train step (off: a faster step; sampling keeps
                                 # them, it decodes faster with them; lm/__init__.py, loop.train_step_compiler_options)
        lr=6e-4,
        schedule="cosine",
        warmup_steps=100,
        min_lr_ratio=0.1,
        weight_decay=0.1,
        decay_embeddings=False,  # AdamW weight decay on embedding tables too
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        grad_clip=1.0,
        log_every=10,
        eval_every=200,
        eval_batches=8,
        checkpoint_every=200,
        keep_checkpoints=3,
    ))
    c.sample = ml_collections.ConfigDict(dict(
        max_new_tokens=64,
        temperature=1.0,         # 0: greedy
        top_k=0,                 # 0: all tokens
        top_p=1.0,
        num_samples=2,
        report_temperatures=(0.7, 1.0),               # lm.main's sample stage
        report_prompts=("The ", "def ", "Return a list of"),
        icl_shots=(0, 1, 4),                          # few-shot sizes of the in-context-learning eval
        icl_queries=32,
    ))
    c.posttrain = ml_collections.ConfigDict(dict(
        # lm.main's post-training stages: the preset each runs (with this config's model, mesh and seed) ...
        sft="configs/sft_tiny.py",
        reward="configs/reward_tiny.py",
        dpo="configs/dpo_tiny.py",
        ppo="configs/ppo_tiny.py",
        hacking="configs/ppo_tiny.py:hacking",
        grpo="configs/grpo_tiny.py",
        # ... its overrides ("key=value" strings, as after --config.) ...
        # (the hacking preset is the one-seed probe; the three-seed study is configs/ppo_tiny.py:hacking_study)
        overrides=ml_collections.ConfigDict(dict(sft=(), reward=(), dpo=(), ppo=(), hacking=(), grpo=())),
        skip=(),                 # ... and stages lm.main leaves out (e.g. ("hacking",))
    ))
    return c
