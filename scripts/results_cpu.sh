#!/usr/bin/env bash
# Reruns the measurements of docs/results.md sections 2-4 on a CPU machine, with the commands shown there:
#   section 3: the two interleaved bench runs (prose 40 openings x 2 seeds, all 164 HumanEval problems;
#              T=1, top-k 10, top-p 0.9, gamma 4, B 4, tau 0.5, 2 threads, scored by a float32 target)
#              and the greedy `ar` pass@1 reference (T=0, 1 thread);
#   section 2: bench_ar.py (float32 mtad-trt vs transformers, 1 thread);
#   section 4: bench_steps.py (int4 target step times, 1 thread) and, where llama-cpp-python is
#              installed, bench_llamacpp.py (1 and 2 threads).
# Not rerun: section 1 (the superseded whole-model exporter), section 4's block-32 and eager-attention
# engines, the peers, and the server numbers (scripts/bench_batching.sh, docs/serve.md).
# Needs: scripts/quickstart.sh done (install, models fetched) and `pip install -e '.[bench]'`.
# About 3 hours on a 2-core VM (section 3: ~80 min of generation, ~1 h of scoring). An interrupted
# bench run continues where it stopped when the script is run again (it passes --resume).
set -euo pipefail
cd "$(dirname "$0")/.."
# Both roles int4 block 128, as behind section 3's tables -- not today's quickstart engine (draft int8).
INT4=${INT4:-engines/qwen2.5-coder-int4}
FP32=${FP32:-engines/qwen2.5-coder-fp32}
OUT=${OUT:-bench-out}
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
[ -f "$INT4/manifest.json" ] || mtad-trt export --draft qwen2.5-coder-0.5b --target qwen2.5-coder-1.5b \
  --out "$INT4" --max-seq-len 2048 --quantize int4
[ -f "$FP32/manifest.json" ] || mtad-trt export --target qwen2.5-coder-1.5b --out "$FP32" --max-seq-len 2048

resume() { if [ -s "$1/records.jsonl" ]; then echo --resume; fi; }
SAMPLING=(--decoders ar,sps,mtad,mmtad --temperature 1 --top-k 10 --top-p 0.9 --gamma 4 --beam-width 4 --threshold 0.5)
mtad-trt bench --engines "$INT4" --score-engines "$FP32" --prompts prose --n 40 --seeds 2 --max-new-tokens 128 \
  "${SAMPLING[@]}" --threads 2 --score-threads 2 --seed 0 --out "$OUT/prose-40x2" $(resume "$OUT/prose-40x2")
mtad-trt bench --engines "$INT4" --score-engines "$FP32" --prompts humaneval --n 164 --seeds 1 --max-new-tokens 128 \
  "${SAMPLING[@]}" --threads 2 --score-threads 2 --seed 0 --out "$OUT/humaneval-164" $(resume "$OUT/humaneval-164")
# The greedy reference row (ar runs the target alone; its perplexity is scored by the int4 target itself).
mtad-trt bench --engines "$INT4" --prompts humaneval --n 164 --seeds 1 --max-new-tokens 128 \
  --decoders ar --temperature 0 --top-k 10 --top-p 0.9 --threads 1 --seed 0 \
  --out "$OUT/humaneval-164-greedy-ar" $(resume "$OUT/humaneval-164-greedy-ar")

python scripts/bench_steps.py --engines "$INT4" --role target --threads 1 --json "$OUT/steps_int4.json"
python scripts/bench_ar.py --engines "$FP32" --hf "$(mtad-trt models list | awk '$1=="qwen2.5-coder-1.5b"{print $3}')" \
  --threads 1 --tokens 48 --json "$OUT/ar_fp32_vs_hf.json"
if python -c "import llama_cpp" 2>/dev/null; then
  python scripts/bench_llamacpp.py --engines "$INT4" "$FP32" --gguf "${MTAD_TRT_HOME:-$HOME/.cache/mtad-trt}/gguf/qwen2.5-coder-1.5b.gguf" \
    --threads 1 2 --n 5 --tokens 64 --json "$OUT/llamacpp.json"
fi
