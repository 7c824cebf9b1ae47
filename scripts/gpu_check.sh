#!/usr/bin/env bash
# The GPU check of docs/gpu.md, in one call of under ten minutes on a lent GPU machine:
#   bash scripts/gpu_check.sh                      # writes $OUT/gpu_check.json and $OUT/gpu_check.log
#   bash scripts/gpu_check.sh --device cpu         # dry run (torch path, tiny models): known to start
# Extra arguments go to scripts/gpu_check.py (--help lists them). It exits 2 before any phase when
# the bench records its speed estimate reads (docs/data/issue13/*/bench.json) are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check-out}"
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# The script saves its JSON after every phase and skips phases past --budget-s (540 s); the
# timeout is the backstop that keeps the call inside ten minutes whatever hangs.
timeout --kill-after=10 "${GPU_CHECK_TIMEOUT:-580}" python3 scripts/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
