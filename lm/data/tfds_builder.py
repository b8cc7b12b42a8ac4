"""A TFDS builder over a tokenized corpus (lm.data.tokenize's shards), so `tfds.load` works offline on local files.

One example per document, in corpus order: {"tokens": int32 [n] (without the end-of-text separator), "document": its
index in the split}. Splits "train" and "validation". The builder config is named after a hash of the corpus index, so a
re-tokenized corpus is prepared afresh instead of being served from a stale copy.

    from lm.data import tfds_builder
    ds = tfds_builder.load(tokens_dir, "train")     # prepared on first use under <tokens_dir>/tfds
    # or, once this module is imported (which registers the builder):
    ds = tfds.load("lm_tokens", split="validation", data_dir=..., builder_kwargs={"tokens_dir": tokens_dir})

Not a pipeline stage, so no absl main: importing the module as __main__ would register the builder twice.
"""
import hashlib
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from lm.data import pipeline, tokenize

SPLITS = {"train": "train", "validation": "val"}   # TFDS split name -> lm.data.tokenize split


def config_for(tokens_dir) -> tfds.core.BuilderConfig:
    index_bytes = (pathlib.Path(tokens_dir) / tokenize.INDEX_FILE).read_bytes()
    return tfds.core.BuilderConfig(name="index_" + hashlib.sha256(index_bytes).hexdigest()[:16],
                                   description=f"tokens from {tokens_dir}")


class LmTokens(tfds.core.GeneratorBasedBuilder):
    """Documents of a tokenized corpus (registered as "lm_tokens")."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, tokens_dir, config=None, **kwargs):
        self.tokens_dir = pathlib.Path(tokens_dir)
        super().__init__(config=config or config_for(self.tokens_dir), **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        index = tokenize.read_index(self.tokens_dir)
        return self.dataset_info_from_configs(
            description=f"Documents tokenized with {index['tokenizer']['name']} "
                        f"(hash {index['tokenizer']['hash'][:16]}, end-of-text id {index['tokenizer']['eot_id']}).",
            features=tfds.features.FeaturesDict({
                "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "document": np.int64,
            }),
            disable_shuffling=True,   # examples in corpus order
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only: nothing is downloaded
        return {name: self._generate_examples(split) for name, split in SPLITS.items()}

    def _generate_examples(self, split):
        data = pipeline.TokenData(self.tokens_dir, split)
        starts = data.doc_starts
        for i in range(data.n_documents):
            start, end = int(starts[i]), int(starts[i + 1]) - 1    # drop the end-of-text separator
            yield i, {"tokens": data.read(start, end - start).astype(np.int32), "document": i}


def load(tokens_dir, split: str = "train", data_dir=None, **load_kwargs):
    """`tfds.load` of the corpus in tokens_dir (prepared on first use under data_dir, default tokens_dir/tfds)."""
    tokens_dir = pathlib.Path(tokens_dir)
    pipeline.import_tensorflow()   # with GPUs hidden from TensorFlow before tfds starts it
    return tfds.load("lm_tokens", split=split, data_dir=str(data_dir or tokens_dir / "tfds"),
                     builder_kwargs={"tokens_dir": tokens_dir}, **load_kwargs)
