#!/usr/bin/env bash
# N processes on this machine form one JAX runtime (jax.distributed over localhost, gloo CPU collectives),
# each with DEVICES virtual CPU devices — the same code path as a multi-host TPU/GPU job.
#   NPROC=2 DEVICES=4 launch/multiprocess_cpu.sh lm.train --config=configs/tiny.py --workdir=runs/mp
# lm.train reads <workdir>/tokens/ (and the samplers <workdir>/tokenizer/): when tokens/ is missing, the data stages
# of lm.main (corpus, filter, tokenizer, tokenize) run first, once, in one process, with the same --config flags
# (--workdir must then be given as --workdir=DIR). The module must define the multi-process flags
# (lm.mesh.define_distributed_flags: lm.train, lm.main, lm.sample do).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC="${NPROC:-2}"; DEVICES="${DEVICES:-4}"; PORT="${PORT:-$((20000 + RANDOM % 20000))}"
module="${1:?usage: launch/multiprocess_cpu.sh MODULE [flags...]}"; shift

if [ "$module" = lm.train ]; then
  workdir=""; config_flags=()
  for arg in "$@"; do
    case "$arg" in
      --workdir=*) workdir="${arg#--workdir=}" ;;
      --config=*|--config.*|--noconfig.*) config_flags+=("$arg") ;;
    esac
  done
  if [ -z "$workdir" ]; then
    echo "multiprocess_cpu.sh: lm.train needs --workdir=DIR (holding tokens/)" >&2; exit 2
  fi
  if [ ! -d "$workdir/tokens" ]; then
    echo "multiprocess_cpu.sh: $workdir/tokens/ is missing; running the data stages of lm.main into $workdir first" >&2
    python -m lm.main "${config_flags[@]}" --workdir="$workdir" --stages=corpus,filter,tokenizer,tokenize
  fi
fi

pids=()
for ((i = 0; i < NPROC; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES" JAX_PLATFORMS=cpu \
    python -m "$module" "$@" --coordinator_address="127.0.0.1:$PORT" --num_processes="$NPROC" --process_id="$i" \
    > >(sed "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
