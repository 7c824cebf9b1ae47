#!/usr/bin/env python3
"""Foundation benchmark: AR decoding of one engine's target vs transformers eager, same threads.

Prints ms per decode step, tokens/s, and the share of step time spent outside the ONNX Runtime
call (the runtime's own overhead: mask building, binding, sampling, bookkeeping).

    python scripts/bench_ar.py --engines engines/qwen2.5-coder-fp32 --hf ~/.cache/mtad-trt/models/qwen2.5-coder-1.5b \
        --threads 1 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", required=True)
    ap.add_argument("--hf", help="HF folder of the same target for the transformers baseline")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", default="Write a Python function that checks whether a number is prime.")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    from mtad_trt import Pipeline

    pipe = Pipeline.load(args.engines, backend="ort", threads=args.threads, load_draft=False)
    eng = pipe.target
    inside: list[float] = []
    run = eng.session.run_with_iobinding

    def timed(binding):
        t0 = time.perf_counter()
        run(binding)
        inside.append(time.perf_counter() - t0)

    eng.session.run_with_iobinding = timed
    ids = pipe.encode(args.prompt, chat=True)
    settings = dict(decoder="ar", temperature=0, max_new_tokens=args.tokens, ignore_eos=True)
    pipe.generate(ids, **{**settings, "max_new_tokens": 4})  # warm-up
    inside.clear()
    step_wall: list[float] = []
    gen = pipe.stream_ids(ids, **settings)
    t_prev = time.perf_counter()
    first = True
    for _ in gen:
        now = time.perf_counter()
        if not first:
            step_wall.append(now - t_prev)
        first = False
        t_prev = now
    decode_inside = inside[1:]  # [0] is the prefill
    ms_step = 1000 * statistics.median(step_wall)
    out = {
        "machine": f"{platform.processor() or platform.machine()} {os.cpu_count()} cores",
        "engine": args.engines,
        "threads": args.threads,
        "tokens": args.tokens,
        "prompt_tokens": len(ids),
        "mtad_ms_per_step_median": ms_step,
        "mtad_tokens_per_s": 1000 / ms_step,
        "ort_ms_per_step_median": 1000 * statistics.median(decode_inside),
        "outside_ort_share": 1 - sum(decode_inside[: len(step_wall)]) / sum(step_wall),
    }
    pipe.close()

    if args.hf:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
        x = torch.tensor([ids])
        with torch.no_grad():
            model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0)
            t0 = time.perf_counter()
            model.generate(x, max_new_tokens=1, do_sample=False, pad_token_id=0)
            t_first = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(x, max_new_tokens=args.tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                           min_new_tokens=args.tokens)
            total = time.perf_counter() - t0
        hf_ms = 1000 * (total - t_first) / (args.tokens - 1)
        out.update(hf_ms_per_step=hf_ms, hf_tokens_per_s=1000 / hf_ms, speedup_vs_hf=hf_ms / ms_step)

    print(json.dumps(out, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
