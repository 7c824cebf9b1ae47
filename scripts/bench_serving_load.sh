#!/usr/bin/env bash
# Serving under load on the default pair, as a user starts it (`mtad-trt serve ENGINES`: every
# default — threads, max batch, prefix cache, the auto policy keeping MTAD's joint verification):
# N streaming chat clients released at once, 48 tokens each, N = 1/4/8/16, for ar, sps and mtad;
# the same with the prefix cache off; mtad with --throughput-first; and, at N = 4, a ~1,500-token
# prompt arriving mid-run (the other streams' inter-token latency while it is prefilled), also with
# --prefill-chunk 32 (the bound on how long one iteration's prefill stalls the running rows). Each
# level also records where the batch's time went (model calls per phase vs host work, /metrics).
#
#   bash scripts/bench_serving_load.sh [ENGINES] [OUT_DIR]
#   ONLY=long bash scripts/bench_serving_load.sh engines/qwen2.5-coder docs/data/serving-long
#     (only the long-prompt runs: the defaults and --prefill-chunk 32)
#   ONLY=throughput bash scripts/bench_serving_load.sh engines/qwen2.5-coder docs/data/serving-throughput-first
#     (ar with the defaults, then mtad with --throughput-first)
#
# Needs a quiet machine. One JSON per (config, decoder) in OUT_DIR (default docs/data/serving-load).
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINES=${1:-engines/qwen2.5-coder}
OUT=${2:-docs/data/serving-load}
PORT=${PORT:-8022}
LEVELS=${LEVELS:-1,4,8,16}
TOKENS=${TOKENS:-48}
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false
source scripts/serve_lib.sh

run_config() {  # name, then "decoder[:levels[:long prompt tokens]]" entries, then -- serve flags...
  local name=$1; shift
  local runs=()
  while [ "$1" != "--" ]; do runs+=("$1"); shift; done
  shift
  start_server "$name" "$@"
  for run in "${runs[@]}"; do
    IFS=: read -r d levels long <<< "$run"
    python3 scripts/bench_serve.py --url "http://127.0.0.1:$PORT" --concurrency "${levels:-$LEVELS}" \
      --requests 1 --max-tokens "$TOKENS" --ignore-eos --temperature 1 --chat \
      --extra "{\"decoder\": \"$d\"}" --long-prompt-tokens "${long:-0}" \
      --json "$OUT/$name.$d${long:+.long$long}.json" > "$OUT/$name.$d${long:+.long$long}.txt"
    sed -n '1,6p' "$OUT/$name.$d${long:+.long$long}.txt"
  done
  stop_server "$name"
}

case "${ONLY:-all}" in
  long)
    run_config defaults ar:4:1500 mtad:4:1500 --
    run_config chunk32 ar:4:1500 mtad:4:1500 -- --prefill-chunk 32 ;;
  throughput)
    run_config defaults ar --
    run_config throughput-first mtad -- --throughput-first ;;
  all)
    run_config defaults ar sps mtad ar:4:1500 mtad:4:1500 --
    run_config no-prefix-cache ar sps mtad -- --prefix-cache-mb 0
    run_config throughput-first mtad -- --throughput-first
    run_config chunk32 ar:4:1500 mtad:4:1500 -- --prefill-chunk 32 ;;
  *) echo "ONLY must be long, throughput or all" >&2; exit 2 ;;
esac
