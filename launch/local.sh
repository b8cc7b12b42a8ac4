#!/usr/bin/env bash
# Run any stage on this machine:  launch/local.sh lm.train --config=configs/tiny.py --workdir=runs/tiny
# With no arguments it runs the whole pipeline on the bundled data.
set -euo pipefail
cd "$(dirname "$0")/.."
module="${1:-lm.main}"
[ $# -gt 0 ] && shift
if [ "$module" = "lm.main" ] && [ $# -eq 0 ]; then set -- --workdir=runs/local; fi
exec python -m "$module" "$@"
