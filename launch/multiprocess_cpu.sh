#!/usr/bin/env bash
# N processes on this machine form one JAX runtime (jax.distributed over localhost, gloo CPU collectives),
# each with DEVICES virtual CPU devices — the same code path as a multi-host TPU/GPU job.
#   NPROC=2 DEVICES=4 launch/multiprocess_cpu.sh lm.train --config=configs/tiny.py --workdir=runs/mp
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC="${NPROC:-2}"; DEVICES="${DEVICES:-4}"; PORT="${PORT:-$((20000 + RANDOM % 20000))}"
module="$1"; shift
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
