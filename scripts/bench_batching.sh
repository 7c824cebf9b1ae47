#!/usr/bin/env bash
# Continuous batching on the default pair: aggregate tok/s, TTFT and ITL for N = 1..16 clients,
# every decoder, against --max-batch 1 (one request at a time), with the speculation policy off
# (fixed γ=4, B=4) and on (auto: requests leave γ/B to the runtime). One run, one machine:
#
#   bash scripts/bench_batching.sh [ENGINES] [OUT_DIR]
#
# Needs a quiet machine (nothing else running); writes one JSON per (config, decoder) and the
# server's resident memory per config into OUT_DIR (default docs/data/batching).
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINES=${1:-engines/qwen2.5-coder}
OUT=${2:-docs/data/batching}
PORT=${PORT:-8021}
LEVELS=${LEVELS:-1,2,4,8,16}
LEVELS_BATCH1=${LEVELS_BATCH1:-$LEVELS}  # the one-at-a-time baseline is queue-linear; fewer levels save time
DECODERS=${DECODERS:-ar sps mtad mmtad}
TOKENS=${TOKENS:-64}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
source scripts/serve_lib.sh
if ! grep -q '"ort-cpu-t2"' "$ENGINES/tuning.json" 2>/dev/null; then  # the auto policy's cost table
  ( time mtad-trt tune "$ENGINES" --threads 2 --max-batch 16 ) 2>&1 | tee "$OUT/tune.txt"
fi

run_config() {  # name, levels, serve flags...
  local name=$1 levels=$2; shift 2
  start_server "$name" --threads 2 --prefix-cache-mb 0 "$@"  # as its stored runs (before the prefix cache)
  for d in $DECODERS; do
    python3 scripts/bench_serve.py --url "http://127.0.0.1:$PORT" --concurrency "$levels" --requests 1 \
      --max-tokens "$TOKENS" --ignore-eos --temperature 1 --chat --extra "{\"decoder\": \"$d\"}" \
      --json "$OUT/$name.$d.json" | tee "$OUT/$name.$d.txt"
  done
  stop_server "$name"
}

run_config batch1 "$LEVELS_BATCH1" --max-batch 1 --spec-policy fixed
run_config batch16-fixed "$LEVELS" --max-batch 16 --spec-policy fixed
run_config batch16-auto "$LEVELS" --max-batch 16 --spec-policy auto
