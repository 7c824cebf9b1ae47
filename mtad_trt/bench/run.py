"""`mtad-trt bench`: speed, acceptance, output quality and energy per token, per decoder.

Every decoder sees the same prompts with the same per-prompt seeds. Timing and energy windows
cover generation only; quality (perplexity under the raw target, HumanEval pass@1) is computed
afterwards, outside the windows. One warm-up request per decoder is excluded.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import mtad_trt
from mtad_trt.bench import energy, metrics, prompts
from mtad_trt.bench.quality import perplexity, token_weighted_perplexity
from mtad_trt.errors import MtadError
from mtad_trt.manifest import sha256_file
from mtad_trt.params import DECODERS, DEFAULTS
from mtad_trt.pipeline import Pipeline
from mtad_trt.stats import Stats

RECORD_VERSION = 1
HUMANEVAL_STOPS = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(")


@dataclass
class BenchConfig:
    engines: str
    decoders: tuple[str, ...] = DECODERS
    prompts: str = "humaneval"
    n: int = 10
    max_new_tokens: int = DEFAULTS["max_new_tokens"]
    backend: str = "auto"
    device: str = "auto"
    threads: int = 1
    seed: int = 0
    temperature: float = DEFAULTS["temperature"]
    top_k: int = DEFAULTS["top_k"]
    top_p: float = DEFAULTS["top_p"]
    gamma: int = DEFAULTS["gamma"]
    beam_width: int = DEFAULTS["beam_width"]
    threshold: float = DEFAULTS["threshold"]
    energy: str = "auto"
    warmup: int = 1
    concurrency: int = 1  # requests at once (batch rows); the rest join as rows free up
    spec_policy: str = "fixed"
    peers: tuple[str, ...] = ()
    out: str = "bench-out"
    score_engines: str | None = None  # score perplexity with this folder's target (e.g. float32 for int4 runs)
    extra: dict = field(default_factory=dict)


def _settings(cfg: BenchConfig, decoder: str, seed: int, stops: tuple[str, ...]) -> dict:
    return dict(decoder=decoder, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=seed,
                max_new_tokens=cfg.max_new_tokens, gamma=cfg.gamma, beam_width=cfg.beam_width,
                threshold=cfg.threshold, stop=stops)


def run_requests(pipe: Pipeline, jobs: list[tuple[list[int], dict]], progress=None) -> list[dict]:
    """Timed requests, up to pipe.max_batch at once (the rest join as rows free up: a closed loop of
    max_batch clients). Every emitted token gets the time its chunk arrived; TTFT counts from when
    the request got its row."""
    reqs = [pipe.prepare(ids, **settings) for ids, settings in jobs]
    times: dict[int, list[float]] = {id(r): [] for r in reqs}
    texts: dict[int, list[str]] = {id(r): [] for r in reqs}
    done = 0
    for update in pipe.run(reqs):
        now = time.perf_counter()
        req = update.request
        if update.piece is not None:
            times[id(req)] += [now] * len(update.piece.token_ids)
            texts[id(req)].append(update.piece.text)
        if update.finished:
            if req.error is not None:
                raise req.error
            done += 1
            if progress:
                progress(done, len(reqs))
    rows = []
    for req in reqs:
        t = times[id(req)] or [time.perf_counter()]
        timing = metrics.RequestTiming.from_token_times(req.started, t)
        rows.append({"token_ids": list(req.output_ids), "text": "".join(texts[id(req)]), "stats": req.stats.to_dict(),
                     "timing": asdict(timing), "tpot_s": timing.tpot_s})
    return rows


def summarize(rows: list[dict], reading: energy.EnergyReading | None, window_s: float | None = None) -> dict:
    total = Stats.total([Stats.from_dict(r["stats"]) for r in rows])
    gen = total.generated_tokens
    lat = metrics.summarize_latencies(metrics.RequestTiming(**r["timing"]) for r in rows)
    lps = [r["logprobs"] for r in rows if r.get("logprobs") is not None and len(r["logprobs"])]
    out = {
        "requests": len(rows),
        "generated_tokens": gen,
        "tokens_per_s": total.tokens_per_s,  # per request: Σ tokens / Σ request wall times
        "aggregate_tokens_per_s": gen / window_s if window_s else None,  # all requests: tokens / window
        "tokens_per_s_per_request": lat.output_tokens_per_s,
        "ttft_s": lat.ttft_s,
        "tpot_s": lat.tpot_s,
        "tokens_per_target_call": total.tokens_per_target_call,
        "acceptance_rate": total.acceptance_rate if total.iterations and total.gamma else None,
        "accepted_per_position": [x / total.iterations for x in total.accepted_per_position] if total.iterations else [],
        "perplexity": perplexity(lps) if lps else None,  # the paper's: mean over samples
        "perplexity_token_weighted": token_weighted_perplexity(lps) if lps else None,
        "time_split_s": {"prefill_s": total.prefill_s, "draft_s": total.draft_s, "verify_s": total.verify_s,
                         "other_s": sum(Stats.from_dict(r["stats"]).other_s for r in rows)},
    }
    if reading is not None:
        out["energy"] = reading.to_dict()
        out["joules_per_token"] = metrics.joules_per_token(reading, gen)
    passes = [r["passed"] for r in rows if "passed" in r]
    if passes:
        out["pass_at_1"] = float(np.mean(passes))
    return out


def _generate_all(pipe, meter, cfg, decoder, items, encoded, stops, progress) -> dict:
    """All prompts through one decoder inside one timing/energy window (after warm-up)."""
    warm = [(encoded[w % len(encoded)], _settings(cfg, decoder, cfg.seed, stops) | {"max_new_tokens": 8})
            for w in range(cfg.warmup)]
    if warm:
        run_requests(pipe, warm)
    jobs = [(ids, _settings(cfg, decoder, cfg.seed + i, stops)) for i, ids in enumerate(encoded)]
    meter.start()
    t0 = time.perf_counter()
    rows = run_requests(pipe, jobs, (lambda done, total: progress(decoder, done, total)) if progress else None)
    window = time.perf_counter() - t0
    for p, row in zip(items, rows, strict=True):
        row["prompt_id"] = p.id
    return {"rows": rows, "reading": meter.stop(), "window_s": window}


def run_bench(cfg: BenchConfig, progress: Callable[[str, int, int], None] | None = None) -> dict:
    for d in cfg.decoders:
        if d not in DECODERS:
            raise MtadError(f"unknown decoder '{d}' (choose from {', '.join(DECODERS)})")
    items = prompts.load(cfg.prompts, cfg.n)
    if not items:
        raise MtadError(f"prompt set '{cfg.prompts}' is empty")
    humaneval = all("entry_point" in p.meta for p in items)
    stops = HUMANEVAL_STOPS if humaneval else ()
    pipe = Pipeline.load(cfg.engines, backend=cfg.backend, device=cfg.device, threads=cfg.threads,
                         load_draft=any(d != "ar" for d in cfg.decoders), max_batch=cfg.concurrency,
                         spec_policy=cfg.spec_policy)
    on_gpu = pipe.backend.endswith("cuda")
    sync = None
    if on_gpu:
        import torch

        sync = torch.cuda.synchronize  # queued GPU work must land inside the measured window
    meter = energy.open_meter(cfg.energy, device="cuda" if on_gpu else "cpu", sync=sync)
    encoded = [pipe.encode(p.text, chat=p.chat) for p in items]
    try:
        results = {d: _generate_all(pipe, meter, cfg, d, items, encoded, stops, progress) for d in cfg.decoders}
    finally:
        meter.close()
        pipe.close()  # free the generating engines before a float32 scorer loads
    # Quality, outside every timed window: perplexity under a raw target, HumanEval in the sandbox.
    scorer = Pipeline.load(cfg.score_engines or cfg.engines, backend=cfg.backend, device=cfg.device,
                           threads=cfg.threads, load_draft=False)
    try:
        if scorer.tokenizer.get_vocab() != pipe.tokenizer.get_vocab():
            raise MtadError(f"{cfg.score_engines} uses another tokenizer than {cfg.engines}: cannot score with it")
        for res in results.values():
            rows = res["rows"]
            for row, ids in zip(rows, encoded, strict=True):
                row["logprobs"] = scorer.score(ids, row["token_ids"])
            if humaneval:
                from mtad_trt.bench.sandbox import check_correctness_batch

                done = check_correctness_batch([(p.meta, r["text"]) for p, r in zip(items, rows, strict=True)],
                                               timeout_s=5.0)
                for row, r in zip(rows, done, strict=True):
                    row["passed"], row["sandbox_status"] = r.passed, r.status
            res["summary"] = summarize(rows, res.pop("reading"), res.pop("window_s", None))
    finally:
        scorer.close()
    for peer in cfg.peers:
        from mtad_trt.bench.peers import run_peer

        results[f"peer:{peer}"] = run_peer(peer, cfg, items, encoded)
    return _record(cfg, pipe, meter, results)


def _record(cfg: BenchConfig, pipe: Pipeline, meter, results: dict) -> dict:
    import onnxruntime
    import torch
    import transformers

    manifest = Path(cfg.engines) / "manifest.json"
    for res in results.values():
        for row in res.get("rows", []):
            lp = row.pop("logprobs", None)
            row["mean_logprob"] = float(np.mean(lp)) if lp is not None and len(lp) else None
            row["scored_tokens"] = 0 if lp is None else len(lp)
    return {
        "record_version": RECORD_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "gpu": _gpu_name()},
        "versions": {"mtad_trt": mtad_trt.__version__, "onnxruntime": onnxruntime.__version__,
                     "torch": torch.__version__, "transformers": transformers.__version__},
        "backend": pipe.backend,
        "engine_manifest_sha256": sha256_file(manifest),
        "energy_method": meter.method,
        "settings": asdict(cfg),
        "results": results,
    }


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None
