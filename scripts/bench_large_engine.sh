#!/usr/bin/env bash
# A 7B-class int4 engine on this machine: generate / serve / bench peak RSS, `mtad-trt tune` step
# costs, and the cost model's predicted speed-ups (scripts/predict_speedup.py, labelled a prediction).
#   bash scripts/bench_large_engine.sh ENGINE_DIR OUT_DIR [THREADS]
# ENGINE_DIR: e.g. the 0.5B draft + a 7B-shaped synthetic target exported with --quantize int4
# (scripts/bench_export.py synth/export). Random weights: the speeds are real, the text is not.
set -euo pipefail
ENGINE=$1
OUT=$2
THREADS=${3:-2}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
peak() { grep -E "Maximum resident|Elapsed" "$1" | sed 's/^\s*//'; }

echo "== generate (mtad, 32 tokens)"
/usr/bin/time -v mtad-trt generate "$ENGINE" --prompt "def quicksort(xs):" --decoder mtad --max-new-tokens 32 \
  --threads "$THREADS" --seed 0 --json > "$OUT/generate.json" 2> "$OUT/generate.time"
peak "$OUT/generate.time"

echo "== generate (ar, 32 tokens)"
/usr/bin/time -v mtad-trt generate "$ENGINE" --prompt "def quicksort(xs):" --decoder ar --max-new-tokens 32 \
  --threads "$THREADS" --seed 0 --json > "$OUT/generate_ar.json" 2> "$OUT/generate_ar.time"
peak "$OUT/generate_ar.time"

echo "== tune (1 row; widths 1, 4, 5, 17)"
/usr/bin/time -v mtad-trt tune "$ENGINE" --max-batch 1 --widths 1,4,5,17 --threads "$THREADS" \
  > "$OUT/tune.txt" 2> "$OUT/tune.time"
cat "$OUT/tune.txt"
peak "$OUT/tune.time"
cp "$ENGINE/tuning.json" "$OUT/tuning.json"

echo "== predicted speed-ups (acceptance of the default pair, prose)"
python3 scripts/predict_speedup.py "$ENGINE" --json "$OUT/prediction.json" | tee "$OUT/prediction.md"

echo "== serve: one chat completion, then SIGTERM"
PORT=${PORT:-8391}
mtad-trt serve "$ENGINE" --port "$PORT" --threads "$THREADS" --model-name large > "$OUT/serve.log" 2>&1 &
PID=$!
for _ in $(seq 1 240); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "large", "prompt": "def fib(n):", "max_tokens": 16, "temperature": 0}' > "$OUT/serve_response.json"
grep -E "VmHWM|VmRSS" "/proc/$PID/status" | tee "$OUT/serve_memory.txt"
kill -TERM "$PID"
wait "$PID" || true

echo "== bench (prose, 2 prompts, ar and mtad, 24 tokens)"
/usr/bin/time -v mtad-trt bench "$ENGINE" --prompts prose --n 2 --decoders ar,mtad --max-new-tokens 24 \
  --threads "$THREADS" --energy none --out "$OUT/bench" > "$OUT/bench.txt" 2> "$OUT/bench.time" || true
peak "$OUT/bench.time"
