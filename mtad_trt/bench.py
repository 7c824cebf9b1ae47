"""`mtad-trt bench`: speed, acceptance, output quality and energy per token, per decoder.

Every decoder sees the same prompts with the same per-prompt seeds. Timing and energy windows
cover generation only; quality (perplexity under the raw target, HumanEval pass@1) is computed
afterwards, outside the windows. One warm-up request per decoder is excluded.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import mtad_trt
from mtad_trt import energy, metrics, prompts
from mtad_trt.decoders import Stats
from mtad_trt.errors import MtadError
from mtad_trt.manifest import sha256_file
from mtad_trt.params import DECODERS
from mtad_trt.pipeline import Pipeline
from mtad_trt.quality import token_logprobs

RECORD_VERSION = 1
HUMANEVAL_STOPS = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(")


@dataclass
class BenchConfig:
    engines: str
    decoders: tuple[str, ...] = DECODERS
    prompts: str = "humaneval"
    n: int = 10
    max_new_tokens: int = 128
    backend: str = "auto"
    device: str = "auto"
    threads: int = 1
    seed: int = 0
    temperature: float = 1.0
    top_k: int = 10
    top_p: float = 0.9
    gamma: int = 4
    beam_width: int = 4
    threshold: float = 0.5
    energy: str = "auto"
    warmup: int = 1
    peers: tuple[str, ...] = ()
    out: str = "bench-out"
    score_engines: str | None = None  # score perplexity with this folder's target (e.g. float32 for int4 runs)
    extra: dict = field(default_factory=dict)


def _settings(cfg: BenchConfig, decoder: str, seed: int, stops: tuple[str, ...]) -> dict:
    return dict(decoder=decoder, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=seed,
                max_new_tokens=cfg.max_new_tokens, gamma=cfg.gamma, beam_width=cfg.beam_width,
                threshold=cfg.threshold, stop=stops)


def run_request(pipe: Pipeline, ids: list[int], settings: dict) -> dict:
    """One timed request: every emitted token gets the arrival time of its chunk."""
    stats = Stats()
    start = time.perf_counter()
    times: list[float] = []
    tokens: list[int] = []
    text_parts: list[str] = []
    for piece in pipe.stream(ids, stats=stats, **settings):
        now = time.perf_counter()
        tokens += piece.token_ids
        times += [now] * len(piece.token_ids)
        text_parts.append(piece.text)
    if not times:
        times = [time.perf_counter()]
    timing = metrics.RequestTiming.from_token_times(start, times)
    return {"token_ids": tokens, "text": "".join(text_parts), "stats": stats.to_dict(), "timing": asdict(timing),
            "tpot_s": timing.tpot_s}


def _score(scorer: Pipeline, ids: list[int], gen: list[int]) -> np.ndarray:
    """Raw-target log-probs of the generated tokens, cut at the first EOS (EOS itself excluded)."""
    cut = next((i for i, t in enumerate(gen) if t in scorer.eos_ids), len(gen))
    return token_logprobs(scorer.target, ids, gen[:cut]) if cut else np.zeros(0)


def summarize(rows: list[dict], gamma: int, reading: energy.EnergyReading | None) -> dict:
    st = [r["stats"] for r in rows]
    gen = sum(s["generated_tokens"] for s in st)
    calls = sum(s["target_calls"] for s in st)
    iters = sum(s["iterations"] for s in st)
    acc = sum(s["accepted_tokens"] for s in st)
    per_pos = np.sum([s["accepted_per_position"] for s in st if s["accepted_per_position"]], axis=0) if iters else []
    lat = metrics.summarize_latencies(metrics.RequestTiming(**r["timing"]) for r in rows)
    wall = sum(s["wall_s"] for s in st)
    lps = [r["logprobs"] for r in rows if r.get("logprobs") is not None and len(r["logprobs"])]
    out = {
        "requests": len(rows),
        "generated_tokens": gen,
        "tokens_per_s": gen / wall if wall else 0.0,
        "tokens_per_s_per_request": lat.output_tokens_per_s,
        "ttft_s": lat.ttft_s,
        "tpot_s": lat.tpot_s,
        "tokens_per_target_call": gen / calls if calls else 0.0,
        "acceptance_rate": acc / (iters * gamma) if iters and gamma else None,
        "accepted_per_position": [float(x) / iters for x in per_pos] if iters else [],
        "perplexity": metrics.perplexity(lps) if lps else None,  # the paper's: mean over samples
        "perplexity_token_weighted": metrics.token_weighted_perplexity(lps) if lps else None,
        "time_split_s": {k: sum(s[k] for s in st) for k in ("prefill_s", "draft_s", "verify_s", "other_s")},
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
    for w in range(cfg.warmup):
        run_request(pipe, encoded[w % len(encoded)], _settings(cfg, decoder, cfg.seed, stops) | {"max_new_tokens": 8})
    rows = []
    meter.start()
    for i, (p, ids) in enumerate(zip(items, encoded, strict=True)):
        row = run_request(pipe, ids, _settings(cfg, decoder, cfg.seed + i, stops))
        row["prompt_id"] = p.id
        rows.append(row)
        if progress:
            progress(decoder, i + 1, len(items))
    return {"rows": rows, "reading": meter.stop()}


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
                         load_draft=any(d != "ar" for d in cfg.decoders))
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
        for decoder, res in results.items():
            rows = res["rows"]
            for row, ids in zip(rows, encoded, strict=True):
                row["logprobs"] = _score(scorer, ids, row["token_ids"])
            if humaneval:
                from mtad_trt.sandbox import check_correctness_batch

                done = check_correctness_batch([(p.meta, r["text"]) for p, r in zip(items, rows, strict=True)],
                                               timeout_s=5.0)
                for row, r in zip(rows, done, strict=True):
                    row["passed"], row["sandbox_status"] = r.passed, r.status
            res["summary"] = summarize(rows, cfg.gamma if decoder != "ar" else 0, res.pop("reading"))
    finally:
        scorer.close()
    for peer in cfg.peers:
        from mtad_trt.peers import run_peer

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


# -- report -----------------------------------------------------------------------------------------
def _fmt(x, spec=".2f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(record: dict) -> str:
    s = record["settings"]
    lines = [
        f"# mtad-trt bench — {record['created']}",
        "",
        f"- engine: `{s['engines']}` (manifest sha256 {record['engine_manifest_sha256'][:12]}), backend {record['backend']}",
        f"- machine: {record['machine']['processor']}, {record['machine']['cpus']} CPUs, GPU: {record['machine']['gpu'] or 'none'}",
        f"- prompts: {s['prompts']} × {s['n']}, {s['max_new_tokens']} new tokens, T={s['temperature']}, "
        f"top-k {s['top_k']}, top-p {s['top_p']}, γ={s['gamma']}, B={s['beam_width']}, τ={s['threshold']}, seed {s['seed']}",
        f"- energy: {record['energy_method']}",
        f"- perplexity scored by: `{s.get('score_engines') or s['engines']}` target (raw softmax, EOS-truncated)",
        "",
        "| decoder | tok/s | TTFT p50 s | TPOT p50 ms | tokens/target call | acceptance | PPL (target) | PPL token-weighted | pass@1 | J/token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in record["results"].items():
        m = res["summary"]
        tpot = m.get("tpot_s") or {}
        if name.startswith("peer:"):
            lines.append(f"| {name} | {_fmt(m['tokens_per_s'])} | – | – | – | – | – | – | – | – |")
            continue
        lines.append(
            f"| {name} | {_fmt(m['tokens_per_s'])} | {_fmt((m.get('ttft_s') or {}).get('p50'), '.3f')} | "
            f"{_fmt(tpot.get('p50', None) and 1000 * tpot['p50'], '.1f')} | {_fmt(m.get('tokens_per_target_call'))} | "
            f"{_fmt(m.get('acceptance_rate'))} | {_fmt(m.get('perplexity'), '.3f')} | "
            f"{_fmt(m.get('perplexity_token_weighted'), '.3f')} | {_fmt(m.get('pass_at_1'))} | "
            f"{_fmt(m.get('joules_per_token'), '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def plots(record: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = {k: v["summary"] for k, v in record["results"].items()}
    names = list(res)
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(names, [res[n]["tokens_per_s"] for n in names], color="tab:blue")
    axes[0].set_title("output tokens/s")
    axes[1].bar(names, [res[n].get("perplexity") or 0 for n in names], color="tab:orange")
    axes[1].set_title("perplexity under the target (lower is better)")
    files.append(_save(fig, out / "speed_quality.png"))
    spec = [n for n in names if res[n].get("accepted_per_position")]
    if spec:
        fig, ax = plt.subplots(figsize=(6, 4))
        for n in spec:
            ax.plot(range(1, len(res[n]["accepted_per_position"]) + 1), res[n]["accepted_per_position"], marker="o", label=n)
        ax.set_xlabel("draft position")
        ax.set_ylabel("share of rounds accepting it")
        ax.legend()
        files.append(_save(fig, out / "acceptance_per_position.png"))
    measured = [n for n in names if res[n].get("joules_per_token")]
    if measured:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar(measured, [res[n]["joules_per_token"] for n in measured], color="tab:green")
        ax.set_title("energy per output token (J)")
        files.append(_save(fig, out / "energy_per_token.png"))
    return files


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(record: dict, out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
    (out / "summary.md").write_text(markdown(record))
    return [out / "bench.json", out / "summary.md", *plots(record, out)]


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x).__name__)
