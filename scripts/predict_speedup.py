"""Predicted speed-up of SpS / MTAD / MMTAD over plain decoding, from measured step costs.

    mtad-trt tune engines/q7 --max-batch 1 --widths 1,4,5,17      # step costs -> engines/q7/tuning.json
    python scripts/predict_speedup.py engines/q7 --acceptance docs/data/issue13/prose-40x2/bench.json

A PREDICTION, not a measurement of the decoders: one request, costs t(role, T) of one call of T
tokens from tuning.json (the engine's own measured table), and the tokens each round emits taken
from a bench run (`tokens_per_target_call` per decoder; by default the default pair's, whose draft
is the same 0.5B model). Per round:

    ar     1 token                     in  t_target(1)
    sps    tokens_per_target_call      in  γ·t_draft(1) + t_target(γ + 1)
    mtad   tokens_per_target_call      in  t_draft(1) + (γ-1)·t_draft(B) + t_target(γ + 1)
    mmtad  tokens_per_target_call      in  t_draft(1) + (γ-1)·t_draft(B) + t_target(1 + B·γ)

(MTAD drafts γ depths of beam search: the first from one token, the next from B beams each.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def cost(points: dict, tokens: int) -> float:
    """Seconds for a call of `tokens` tokens, interpolated linearly between measured points."""
    xs = sorted(int(k) for k in points)
    ys = [float(points[str(x)] if str(x) in points else points[x]) for x in xs]
    return float(np.interp(tokens, xs, ys))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines", type=Path)
    ap.add_argument("--acceptance", type=Path, default=Path("docs/data/issue13/prose-40x2/bench.json"))
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--beam-width", type=int, default=4)
    ap.add_argument("--key", default=None, help="tuning.json entry (default: the only / first one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    table = json.loads((args.engines / "tuning.json").read_text())
    key = args.key or next(iter(table))
    pts = table[key]["points"]
    bench = json.loads(args.acceptance.read_text())
    tpc = {d: bench["results"][d]["summary"]["tokens_per_target_call"] for d in ("sps", "mtad", "mmtad")}
    g, b = args.gamma, args.beam_width
    td, tt = pts["draft"], pts["target"]
    rounds = {
        "ar": (1.0, cost(tt, 1)),
        "sps": (tpc["sps"], g * cost(td, 1) + cost(tt, g + 1)),
        "mtad": (tpc["mtad"], cost(td, 1) + (g - 1) * cost(td, b) + cost(tt, g + 1)),
        "mmtad": (tpc["mmtad"], cost(td, 1) + (g - 1) * cost(td, b) + cost(tt, 1 + b * g)),
    }
    ar_rate = 1.0 / rounds["ar"][1]
    rows = []
    print(f"step costs from {args.engines}/tuning.json [{key}]; tokens per round from {args.acceptance}")
    print("| decoder | tokens / round | s / round | predicted tok/s | vs ar | vs sps |")
    print("|---|---|---|---|---|---|")
    for name, (tokens, secs) in rounds.items():
        rate = tokens / secs
        sps_rate = rounds["sps"][0] / rounds["sps"][1]
        rows.append({"decoder": name, "tokens_per_round": tokens, "seconds_per_round": secs, "tokens_per_s": rate,
                     "vs_ar": rate / ar_rate, "vs_sps": rate / sps_rate})
        print(f"| {name} | {tokens:.2f} | {secs:.3f} | {rate:.2f} | {rate / ar_rate:.2f}x | {rate / sps_rate:.2f}x |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"engines": str(args.engines), "key": key, "points": pts,
                                         "acceptance": str(args.acceptance), "gamma": g, "beam_width": b,
                                         "rows": rows, "label": "prediction"}, indent=1) + "\n")


if __name__ == "__main__":
    main()
