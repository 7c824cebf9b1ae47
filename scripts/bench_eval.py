#!/usr/bin/env python3
"""lm-evaluation-harness through `mtad-trt serve` on the repo's tasks, per decoder, and what
returning log-probabilities costs the server.

    python scripts/bench_eval.py [--engines engines/qwen2.5-coder] [--out docs/data/eval]

For each decoder (ar, mtad) a server is started in-process on a free loopback port with that
server default, and lm-eval's `local-completions` model runs `mtad_arith_mc` (multiple choice, by
log-likelihood: the target's log-probs, so every decoder must score alike) and `mtad_complete`
(generation, exact match) from evals/tasks. Accuracy gets a Wilson 95% interval. Then, on the
mtad server, `scripts/bench_serve.py` drives completions at N = 1 and 8 with `logprobs: 5` and
without (same run, alternated). Needs the `eval` and `serve` extras and a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default="engines/qwen2.5-coder", help="Relative to the repository root.")
    ap.add_argument("--out", default=str(REPO / "docs" / "data" / "eval"))
    ap.add_argument("--decoders", default="ar,mtad")
    args = ap.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    os.chdir(REPO)  # the task files name their data relative to the repository root
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mtad_trt.bench.stats import wilson
    from mtad_trt.serve import ServerSettings, ServerThread, create_app

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"engines": args.engines, "tasks": {}, "logprobs_cost": None}
    for decoder in args.decoders.split(","):
        settings = ServerSettings(engines=args.engines, backend="ort", max_batch=8, max_queue=64,
                                  defaults={"decoder": decoder})
        pipe = settings.load()
        try:
            app = create_app(pipe, settings)
            with ServerThread(app) as url:
                t0 = time.perf_counter()
                res = lm_eval.simple_evaluate(
                    model="local-completions",
                    model_args={"model": pipe.info().name, "base_url": f"{url}/v1/completions",
                                "tokenizer": str(Path(args.engines) / "tokenizer"), "tokenizer_backend": "huggingface",
                                "tokenized_requests": True, "batch_size": 4, "max_length": 2000, "max_retries": 1},
                    tasks=["mtad_arith_mc", "mtad_complete"],
                    task_manager=TaskManager(include_path=str(REPO / "evals" / "tasks"), include_defaults=False),
                    log_samples=True, bootstrap_iters=0)
                seconds = time.perf_counter() - t0
                for task, metrics in res["results"].items():
                    samples = res["samples"][task]
                    key = "acc" if task == "mtad_arith_mc" else "exact_match"
                    score = next(v for k, v in metrics.items() if k.split(",")[0] == key and isinstance(v, float))
                    hits = round(score * len(samples))  # the harness's own score (its first filter)
                    lo, hi = wilson(hits, len(samples))
                    record["tasks"].setdefault(task, {})[decoder] = {
                        "n": len(samples), "correct": hits, "accuracy": hits / len(samples) if samples else 0.0,
                        "wilson95": [lo, hi], "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
                record.setdefault("seconds", {})[decoder] = seconds
                if decoder == args.decoders.split(",")[-1]:
                    runs = {}
                    for n in (1, 8):
                        for name, extra in (("off", {}), ("on", {"logprobs": 5}), ("off2", {}), ("on2", {"logprobs": 5})):
                            res_json = out / f"logprobs_{name}_n{n}.json"
                            subprocess.run([sys.executable, str(REPO / "scripts" / "bench_serve.py"), "--url", url,
                                            "--concurrency", str(n), "--requests", "2", "--max-tokens", "48",
                                            "--ignore-eos", "--temperature", "1", "--extra", json.dumps(extra),
                                            "--json", str(res_json)], check=True, capture_output=True)
                            level = json.loads(res_json.read_text())["levels"][0]
                            runs.setdefault(n, {})[name] = level["output_tokens_per_s"]
                            res_json.unlink()
                    record["logprobs_cost"] = {"decoder": decoder, "output_tok_per_s": runs}
        finally:
            pipe.close()
    (out / "eval.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
