#!/usr/bin/env bash
# Reproduces docs/results.md on a CPU machine: the default pair (int4 engine for generation, float32
# engine for scoring perplexity), decoders side by side, step times, and llama.cpp.
# Needs: scripts/quickstart.sh done (int4 engine) and `QUANTIZE=none bash scripts/quickstart.sh`
# (float32 engine); `pip install llama-cpp-python` for the llama.cpp row. ~1 hour on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
INT4=${INT4:-engines/qwen2.5-coder}
FP32=${FP32:-engines/qwen2.5-coder-fp32}
OUT=${OUT:-bench-out}
N=${N:-10}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
for set in humaneval prose; do
  mtad-trt bench --engines "$INT4" --score-engines "$FP32" --prompts $set --n "$N" --max-new-tokens 128 \
    --threads 1 --seed 0 --out "$OUT/$set"
done
python scripts/bench_steps.py --engines "$INT4" --role target --threads 1 --json "$OUT/steps_int4.json"
python scripts/bench_ar.py --engines "$FP32" --hf "$(mtad-trt models list | awk '$1=="qwen2.5-coder-1.5b"{print $3}')" \
  --threads 1 --tokens 48 --json "$OUT/ar_fp32_vs_hf.json"
if python -c "import llama_cpp" 2>/dev/null; then
  python scripts/bench_llamacpp.py --engines "$INT4" "$FP32" --gguf "${MTAD_TRT_HOME:-$HOME/.cache/mtad-trt}/gguf/qwen2.5-coder-1.5b.gguf" \
    --threads 1 2 --n 5 --tokens 64 --json "$OUT/llamacpp.json"
fi
