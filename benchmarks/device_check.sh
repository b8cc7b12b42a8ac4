#!/usr/bin/env bash
# GPU readiness check, one script for one device run (about 5 minutes on an H200; under 8 in all):
#   0. lm.model, lm.train.loop and lm.sample import with TensorFlow blocked (the GPU image has none);
#   1. gpt2_124m and 2. a 386M LLaMA-style model train in bf16 on synthetic batches (benchmarks/gpu_train.py):
#      tokens/s and MFU against the dense bf16 peak (H200: 989 TFLOP/s; goal >= 50%), cuDNN attention through
#      jax.nn.dot_product_attention (config.model.attention=dot_product);
#   3. decode tokens/s of gpt2_124m through lm.sample.generate_ids (KV cache, greedy) at batch 1 and 64;
#   4. GRPO steps of a random gpt2_124m-shaped model (16 prompts x 8 samples, 128 new tokens): the rollout / update
#      split of the median step (benchmarks/gpu_grpo.py, the same code as bench_grpo.py's side against TRL).
# Each stage writes a JSON file under $OUT (default /tmp/device_check) and prints one summary line.
#
# The GPU image (Python 3.12) has no ml-collections (lm.config needs it) and no rustbpe (the GRPO stage trains its
# small BPE): carry their wheels. Once, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl ml-collections==1.1.0 \
#       rustbpe==0.1.0
# then, with the device tool: run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=540).
# (absl-py and PyYAML, its only dependencies, are in the image.)
#
# DEVICE_CHECK_TINY=1 runs every stage with tiny shapes on whatever jax finds (a CPU check, well under a minute
# on a quiet machine).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
TINY=${DEVICE_CHECK_TINY:-0}
status=0

stage() {  # stage NAME SECONDS COMMAND...: runs COMMAND with a time limit, logs to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -E "^(I|W)[0-9]{4} " | tail -n 25
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start))s"
  [ "$rc" -eq 0 ] || status=1
}

for module in ml_collections rustbpe; do
  $PY -c "import $module" 2>/dev/null && continue
  if ls .whl/"$module"-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/"$module"-*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else
    echo "$module is not installed and no .whl/$module-*.whl was carried (see the header of $0)"
    exit 2
  fi
done
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"

stage imports 120 $PY -c "
import sys
sys.modules['tensorflow'] = None  # any 'import tensorflow' now raises ImportError
import lm.model, lm.train.loop, lm.sample, lm.train.pretrain
print('lm.model, lm.train.loop, lm.sample import without tensorflow')"

if [ "$TINY" = 1 ]; then
  GPT2="--config=configs/tiny.py --config.model.vocab_size=512"
  LLAMA="--config=configs/tiny.py:llama --config.model.vocab_size=512"
  STEPS="--config.train.seq_len=64 --batch_size=4 --steps=3 --warmup=1 --log_every=1"
  DECODE="--batches=1,4 --prompt_len=8 --new_tokens=8 --repeats=1"
  GRPO="--model_config=configs/tiny.py --prompts=2 --group=4 --new_tokens=8 --steps=4"
  LIMIT=300  # generous for a loaded machine; about 30 s each on a quiet one
else
  GPT2="--config=configs/gpt2_124m.py"
  # 24 layers, d_model 1024, 16 heads (8 kv heads), SwiGLU 2816, untied 50304 vocabulary: 386M parameters.
  LLAMA="--config=configs/gpt2_124m.py:llama --config.model.n_layers=24 --config.model.d_model=1024
         --config.model.n_heads=16 --config.model.n_kv_heads=8 --config.model.d_ff=2816"
  STEPS="--config.train.seq_len=1024 --batch_size=32 --steps=60 --warmup=10 --log_every=20"
  DECODE="--batches=1,64 --prompt_len=128 --new_tokens=256 --repeats=3"
  GRPO="--model_config=configs/gpt2_124m.py --prompts=16 --group=8 --new_tokens=128 --steps=6"
  LIMIT=200
fi

# shellcheck disable=SC2086  # the option lists are meant to split
stage train_gpt2 $LIMIT $PY benchmarks/gpu_train.py $GPT2 $STEPS --output="$OUT/train_gpt2.json"
# shellcheck disable=SC2086
stage train_llama $LIMIT $PY benchmarks/gpu_train.py $LLAMA $STEPS --output="$OUT/train_llama.json"
# shellcheck disable=SC2086
stage decode $LIMIT $PY benchmarks/gpu_train.py --decode $GPT2 $DECODE --output="$OUT/decode.json"

# shellcheck disable=SC2086
stage grpo $LIMIT $PY benchmarks/gpu_grpo.py $GRPO --output="$OUT/grpo.json"

echo "=== summary"
for f in "$OUT"/*.json; do [ -f "$f" ] && echo "$(basename "$f"): $(tr -d '\n ' < "$f" | cut -c1-400)"; done
exit $status
