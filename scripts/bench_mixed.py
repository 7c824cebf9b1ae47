#!/usr/bin/env python3
"""What mixing decoders in one batch costs: rows with different widths share each call, padded to
the widest (one call per phase). Offline batches through the scheduler, interleaved, one run:

    python scripts/bench_mixed.py --engines engines/qwen2.5-coder --threads 2 --rows 8 --tokens 48

Prints aggregate output tok/s of an all-`ar` batch, an all-`X` batch, a half/half batch (one call
per phase, ar rows padded to X's verify width), and the same two halves run as two batches one
after the other (what keeping the widths apart would at best save, minus the cost of running the
halves back to back instead of together).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--other", default="mmtad", help="The decoder mixed with ar.")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="Also write the numbers here.")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from mtad_trt import Pipeline

    prompts = [f"Write a Python function number {i} that sorts a list." for i in range(args.rows)]
    common = dict(temperature=0, max_new_tokens=args.tokens, ignore_eos=True, chat=True)
    half = args.rows // 2
    batches = {
        "ar": [{"decoder": "ar"}] * args.rows,
        args.other: [{"decoder": args.other}] * args.rows,
        "mixed": [{"decoder": "ar"}] * half + [{"decoder": args.other}] * (args.rows - half),
        "ar-half": [{"decoder": "ar"}] * half,
        f"{args.other}-half": [{"decoder": args.other}] * (args.rows - half),
    }
    times: dict[str, list[float]] = {k: [] for k in batches}
    with Pipeline.load(args.engines, backend="ort", threads=args.threads, max_batch=args.rows) as pipe:
        pipe.generate(prompts[:2], settings=[{"decoder": args.other}] * 2, **{**common, "max_new_tokens": 4})
        for _ in range(args.repeats):  # interleaved, so drift hits every batch alike
            for name, per in batches.items():
                t0 = time.perf_counter()
                outs = pipe.generate(prompts[: len(per)], settings=per, **common)
                times[name].append(time.perf_counter() - t0)
                assert sum(o.stats.generated_tokens for o in outs) == len(per) * args.tokens
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: len(batches[k]) * args.tokens / t for k, t in med.items()}
    t_apart = med["ar-half"] + med[f"{args.other}-half"]
    result = {"rows": args.rows, "tokens_per_row": args.tokens, "threads": args.threads,
              "tok_per_s": rate, "halves_back_to_back_tok_per_s": args.rows * args.tokens / t_apart, "seconds": times}
    for k, v in rate.items():
        print(f"{k:>10}: {v:6.1f} tok/s")
    print(f"halves back to back: {args.rows * args.tokens / t_apart:6.1f} tok/s (mixed batch: {rate['mixed']:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
