#!/usr/bin/env python3
"""Step-time benchmark of one engine role: ms per graph call by S bucket, step width T and rows B.

T=1 is a decode step, T=γ+1 a verify chain, T=1+B·γ an MMTAD tree; B > 1 is a batched step (every
row the same shape, as continuous batching runs them). Each row holds about a bucket's worth of
committed tokens (the mask is realistic); the cache holds random values, written directly (a step
costs the same whatever the values, and filling 16 rows at 2,048 slots by prefill would take
minutes). Median of --repeat calls after one warm-up.

    python scripts/bench_steps.py --engines engines/qwen2.5-coder --role target --threads 2 --rows 1,4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", required=True)
    ap.add_argument("--role", default="target")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--buckets", default="128,512,2048")
    ap.add_argument("--widths", default="1,5,17")
    ap.add_argument("--rows", default="1", help="batch rows per step, comma-separated")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()

    from mtad_trt.backends.ort import OrtRunner
    from mtad_trt.backends.rows import fill_row
    from mtad_trt.contract import StepInputs
    from mtad_trt.folder.manifest import Manifest

    m = Manifest.load(args.engines)
    entry = m.role(args.role)
    spec = entry.spec
    batches = [int(x) for x in args.rows.split(",")]
    runner = OrtRunner(f"{args.engines}/{entry.onnx}", spec, threads=args.threads, batch=max(batches))
    rng = np.random.default_rng(0)
    rows = []
    for s in (int(x) for x in args.buckets.split(",")):
        if s > spec.max_seq_len:
            continue
        runner.reset()
        runner.reserve(s)
        for view in runner.cache.views:
            view[...] = rng.standard_normal(view.shape, dtype=np.float32).astype(view.dtype)
        for b in batches:
            for t in (int(x) for x in args.widths.split(",")):
                n = s - t - 8  # committed tokens per row: the bucket is s
                parents = None if t <= 5 else [-1] + [0] * 4 + list(range(1, t - 4))[: t - 5]
                inp = StepInputs.zeros(b, t, t, s, window=spec.window)
                for r in range(b):
                    fill_row(inp, r, n, rng.integers(0, 1000, t).tolist(), parents, None, range(t))
                times = []
                for _ in range(args.repeat + 1):
                    t0 = time.perf_counter()
                    runner.step(inp)
                    times.append(time.perf_counter() - t0)
                assert runner.bucket == s, (runner.bucket, s)
                row = {"S": s, "T": t, "B": b, "ms": 1000 * statistics.median(times[1:])}
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = {"engine": args.engines, "role": args.role, "threads": args.threads,
           "quantization": entry.quantization.get("scheme"),
           "attention": m.export_settings.get("attention"), "rows": rows}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
