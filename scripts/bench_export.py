"""Peak RSS and wall time of the streaming export, each stage in its own process.

    python scripts/bench_export.py synth --config qwen2.5-7b --out /data/ck-7b       # write a checkpoint
    python scripts/bench_export.py export --target /data/ck-7b --out engines/q7 --quantize int4
    bash scripts/bench_large_engine.sh engines/q7 out/                               # generate/serve/bench/tune

Every command appends one JSON line to --record (default docs/data/export/runs.jsonl): the
command, its wall time, the child's peak RSS (ru_maxrss of the finished child, so the measuring
process is not counted) and, for exports, the per-stage figures the manifest records.
Synthetic checkpoints have real configs and random bf16 weights (tests/synthetic.py): step time
and memory depend on shapes, not values.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

def run_child(cmd: list[str], record: Path, label: str, extra: dict | None = None) -> int:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # MiB, the largest child so far
    row = {"label": label, "cmd": cmd, "rc": proc.returncode, "wall_s": round(wall, 1), "peak_rss_mb": round(peak),
           "cores": os.cpu_count(), **(extra or {})}
    record.parent.mkdir(parents=True, exist_ok=True)
    with record.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return proc.returncode


def synth(args) -> None:
    from synthetic import CONFIGS, write_checkpoint
    from transformers import AutoConfig

    from tiny import make_tokenizer

    fields = dict(CONFIGS[args.config])
    if args.layers:
        fields["num_hidden_layers"] = args.layers
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    tok = make_tokenizer()
    write_checkpoint(Path(args.out), cfg, shards=args.shards, tokenizer=tok)


def export(args) -> None:
    from mtad_trt.export.pair import export_pair

    q = {role: args.quantize for role in ("draft", "target")} if args.quantize != "none" else {}
    dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[args.dtype]
    m = export_pair(args.draft, args.target, args.out, max_seq_len=args.max_seq_len, dtype=dtype, force=True,
                    quantize=q, progress=lambda s: print(s, flush=True))
    for role, e in m.roles.items():
        print(json.dumps({"role": role, "stages": e.export["stages"], "data_bytes": e.export["data_bytes"],
                          "full_model": e.parity.get("full_model"), "truncated_worst": e.parity["worst"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", type=Path, default=ROOT / "docs/data/export/runs.jsonl")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth")
    s.add_argument("--config", choices=["qwen2.5-7b", "qwen2.5-1.5b"], required=True)
    s.add_argument("--layers", type=int, default=0)
    s.add_argument("--shards", type=int, default=4)
    s.add_argument("--out", required=True)
    e = sub.add_parser("export")
    e.add_argument("--draft")
    e.add_argument("--target", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--quantize", default="int4")
    e.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    e.add_argument("--max-seq-len", type=int, default=2048)
    args = ap.parse_args()
    if args.child:
        {"synth": synth, "export": export}[args.cmd](args)
        return
    argv = [a for a in sys.argv[1:]]
    sys.exit(run_child([sys.executable, __file__, "--child", *argv], args.record, args.cmd,
                       {"args": {k: v for k, v in vars(args).items() if k not in ("record", "child")}}))


if __name__ == "__main__":
    main()
