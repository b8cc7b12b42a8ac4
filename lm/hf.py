"""The program for lm.model.hf (HF transformers weights in and out); it sits above lm.checkpoint, since it reads runs.

    python -m lm.hf --from_hf=DIR                  load an HF checkpoint, print its config and a forward pass
    python -m lm.hf --workdir=W --to_hf=DIR        export the latest checkpoint of a run in HF format
"""
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lm import checkpoint
from lm.model import hf, param_count

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("from_hf", None, "HF checkpoint directory (config.json + *.safetensors) to load.")
    flags.DEFINE_string("to_hf", None, "Directory to export the run's checkpoint to, in HF format.")
    flags.DEFINE_string("workdir", None, "Run directory whose checkpoint --to_hf exports.")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.from_hf:
        model_config, model = hf.load_hf(FLAGS.from_hf)
        print(model_config)
        tokens = jnp.arange(8, dtype=jnp.int32)[None] % model_config.vocab_size
        logits = model(tokens)
        print(f"parameters: {param_count(model_config):,}; logits on tokens 0..7: shape {logits.shape}, "
              f"argmax {np.asarray(logits.argmax(-1))[0].tolist()}")
    elif FLAGS.to_hf:
        if not FLAGS.workdir:
            raise app.UsageError("--to_hf needs --workdir")
        model, tok, config, meta = checkpoint.load_run(FLAGS.workdir, step=FLAGS.step)
        out = hf.export_hf(model, config.model, FLAGS.to_hf, bos_token_id=tok.eot_id, eos_token_id=tok.eot_id)
        print(f"exported step {meta.get('step')} of {FLAGS.workdir} to {out}")
    else:
        raise app.UsageError("pass --from_hf=DIR, or --workdir=W --to_hf=DIR")


if __name__ == "__main__":
    define_flags()
    app.run(main)
