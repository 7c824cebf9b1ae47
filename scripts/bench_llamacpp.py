#!/usr/bin/env python3
"""CPU fast-path comparison: AR decode speed of mtad-trt engines vs llama.cpp on the same prompts.

llama.cpp runs the target's original Q4_K_M GGUF through the `llama-cpp-python` package, which
builds llama.cpp from source and is kept out of the test suite. On our VMs the default
(-march=native) build crashed with a general protection fault in libggml-cpu; this build works:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" pip install llama-cpp-python Both sides
decode greedily from the same token ids, with the same thread count; decode tokens/s counts the
tokens after the first (prefill excluded), median over prompts.

    python scripts/bench_llamacpp.py --engines engines/qwen2.5-coder engines/qwen2.5-coder-fp32 \
        --gguf ~/.cache/mtad-trt/gguf/qwen2.5-coder-1.5b.gguf --threads 1 2 --n 5 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def decode_rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


def run_mtad(engine: str, prompts: list[list[int]], threads: int, tokens: int) -> dict:
    from mtad_trt import Pipeline

    rates, ttfts = [], []
    with Pipeline.load(engine, backend="ort", threads=threads, load_draft=False) as pipe:
        pipe.generate(prompts[0], decoder="ar", temperature=0, max_new_tokens=4)
        for ids in prompts:
            t0, times = time.perf_counter(), []
            for chunk in pipe.stream_ids(ids, decoder="ar", temperature=0, max_new_tokens=tokens, ignore_eos=True):
                times += [time.perf_counter()] * len(chunk)
            ttfts.append(times[0] - t0)
            rates.append(decode_rate(times))
    return {"decode_tok_s": statistics.median(rates), "ttft_s": statistics.median(ttfts)}


def run_llamacpp(gguf: str, prompts: list[list[int]], threads: int, tokens: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=2048, verbose=False)
    rates, ttfts = [], []
    llm.create_completion(prompts[0], max_tokens=4, temperature=0)
    for ids in prompts:
        llm.reset()
        t0, times = time.perf_counter(), []
        for _ in llm.create_completion(ids, max_tokens=tokens, temperature=0, stream=True):
            times.append(time.perf_counter())
        ttfts.append(times[0] - t0)
        rates.append(decode_rate(times))
    return {"decode_tok_s": statistics.median(rates), "ttft_s": statistics.median(ttfts)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", nargs="+", required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--threads", nargs="+", type=int, default=[1])
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()

    from pathlib import Path

    from mtad_trt.bench import prompts as prompt_sets
    from mtad_trt.folder.tokenizer import Tokenizer

    tok = Tokenizer(Path(args.engines[0]) / "tokenizer")
    items = prompt_sets.load("humaneval", args.n)
    ids = [tok.encode(p.text) for p in items]
    rows = []
    for t in args.threads:
        for e in args.engines:
            rows.append({"system": f"mtad-trt {e}", "threads": t, **run_mtad(e, ids, t, args.tokens)})
            print(json.dumps(rows[-1]), flush=True)
        rows.append({"system": "llama.cpp Q4_K_M", "threads": t, **run_llamacpp(args.gguf, ids, t, args.tokens)})
        print(json.dumps(rows[-1]), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"prompts": f"humaneval x {args.n}", "tokens": args.tokens, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
