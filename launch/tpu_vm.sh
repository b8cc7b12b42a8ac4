#!/usr/bin/env bash
# Run on every worker of a Cloud TPU VM slice (jax.distributed finds the other hosts by itself on TPU).
#   TPU=my-v5e-32 ZONE=us-west4-a launch/tpu_vm.sh lm.train --config=configs/gpt2_124m.py --workdir=gs://bucket/run1
# First call with SETUP=1 to copy the repo and install it on all workers.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
cd "$(dirname "$0")/.."
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"; }
if [ "${SETUP:-0}" = 1 ]; then
  gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all . "$TPU":~/lm
  ssh_all "cd ~/lm && python3 -m venv .venv && . .venv/bin/activate && pip install -e . 'jax[tpu]==0.10.2'"
fi
ssh_all "cd ~/lm && . .venv/bin/activate && python -m $* 2>&1 | tee -a ~/lm_\$(hostname).log"
