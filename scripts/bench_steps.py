#!/usr/bin/env python3
"""Step-time benchmark of one engine role: ms per graph call by S bucket and step width T.

T=1 is a decode step, T=γ+1 a verify chain, T=1+B·γ an MMTAD tree. The cache is filled to about
the bucket size so the mask is realistic. Median of --repeat calls after one warm-up.

    python scripts/bench_steps.py --engines engines/qwen2.5-coder --role target --threads 1
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
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()

    from mtad_trt.backends.ort import OrtRunner
    from mtad_trt.backends.rows import Row
    from mtad_trt.folder.manifest import Manifest

    m = Manifest.load(args.engines)
    entry = m.role(args.role)
    seq = Row(OrtRunner(f"{args.engines}/{entry.onnx}", entry.spec, threads=args.threads))
    rng = np.random.default_rng(0)
    rows = []
    for s in (int(x) for x in args.buckets.split(",")):
        if s > entry.spec.max_seq_len:
            continue
        for t in (int(x) for x in args.widths.split(",")):
            seq.reset()
            fill = s - t - 8  # committed tokens: the bucket is s
            chunk = 256
            while seq.n < fill:  # fill the cache with chunked prefills
                k = min(chunk, fill - seq.n)
                seq.forward(rng.integers(0, 1000, k).tolist())
                seq.commit_chain(k)
            toks = rng.integers(0, 1000, t).tolist()
            parents = None if t <= 5 else [-1] + [0] * 4 + list(range(1, t - 4))[: t - 5]
            times = []
            for _ in range(args.repeat + 1):
                t0 = time.perf_counter()
                seq.forward(toks, parents=parents, logits_rows=range(t))
                times.append(time.perf_counter() - t0)
            assert seq.runner.bucket == s, (seq.runner.bucket, s)
            row = {"S": s, "T": t, "ms": 1000 * statistics.median(times[1:])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"engine": args.engines, "role": args.role, "threads": args.threads,
           "quantization": entry.quantization.get("scheme"), "rows": rows}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
