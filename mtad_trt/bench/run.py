"""`mtad-trt bench`: speed, acceptance, output quality and energy per token, per decoder and peer.

The run, in three phases:

1. generation, interleaved (`interleave`): prompt by prompt (or batch by batch with --concurrency),
   every decoder and peer runs the same (prompt, seed) jobs in a rotated order, each inside its own
   timing/energy window; every request is appended to the journal as it finishes (`journal`), so an
   interrupted run resumes with --resume. One warm-up request per decoder per session is excluded.
2. quality, outside every timed window: perplexity of each output under a raw target
   (--score-engines, e.g. float32 for int4 runs) and HumanEval pass@1 in the sandbox, also journaled.
3. the record: per-system summaries and paired statistics (`summary`, `stats`), written by `report`.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mtad_trt
from mtad_trt.bench import energy, interleave, metrics, prompts
from mtad_trt.bench.journal import JOURNAL, Journal
from mtad_trt.bench.summary import build_results, run_time
from mtad_trt.engine.params import DECODERS, DEFAULTS
from mtad_trt.errors import MtadError
from mtad_trt.folder.manifest import sha256_file
from mtad_trt.pipeline import Pipeline

RECORD_VERSION = 2
HUMANEVAL_STOPS = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(")
PEER_PREFIX = "peer:"
# Settings that do not change the results: a resumed run may differ in these.
NOT_IN_FINGERPRINT = ("out", "resume", "score_threads", "n_boot")

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class BenchConfig:
    engines: str
    decoders: tuple[str, ...] = DECODERS
    prompts: str = "humaneval"
    n: int = 10
    seeds: int = 1  # seeds per prompt: prompt i, seed index k uses seed + i + k * interleave.SEED_STRIDE
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
    concurrency: int = 1  # requests at once (batch rows); the interleaving unit is then a batch
    spec_policy: str = "fixed"
    peers: tuple[str, ...] = ()
    peer_ort_model: str | None = None  # ORT GenAI model folder (default: built from the target's HF folder)
    peer_gguf: str | None = None  # llama.cpp GGUF (default: the target's fetched GGUF)
    out: str = "bench-out"
    resume: bool = False
    score_engines: str | None = None  # score perplexity with this folder's target (e.g. float32 for int4 runs)
    score_threads: int | None = None  # threads for scoring (outside every timed window); default: threads
    n_boot: int = 10_000  # bootstrap resamples for every interval
    extra: dict = field(default_factory=dict)


def fingerprint(cfg: BenchConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_FINGERPRINT}


def _settings(cfg: BenchConfig, decoder: str, seed: int, stops: tuple[str, ...]) -> dict:
    return dict(decoder=decoder, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=seed,
                max_new_tokens=cfg.max_new_tokens, gamma=cfg.gamma, beam_width=cfg.beam_width,
                threshold=cfg.threshold, stop=stops)


def run_requests(pipe: Pipeline, jobs: list[tuple[list[int], dict]]) -> list[dict]:
    """Timed requests, up to pipe.max_batch at once (the rest join as rows free up: a closed loop of
    max_batch clients). Every emitted token gets the time its chunk arrived; TTFT counts from when
    the request got its row."""
    reqs = [pipe.prepare(ids, **settings) for ids, settings in jobs]
    times: dict[int, list[float]] = {id(r): [] for r in reqs}
    texts: dict[int, list[str]] = {id(r): [] for r in reqs}
    for update in pipe.run(reqs):
        now = time.perf_counter()
        req = update.request
        if update.piece is not None:
            times[id(req)] += [now] * len(update.piece.token_ids)
            texts[id(req)].append(update.piece.text)
        if update.finished and req.error is not None:
            raise req.error
    rows = []
    for req in reqs:
        t = times[id(req)] or [time.perf_counter()]
        timing = metrics.RequestTiming.from_token_times(req.started, t)
        rows.append({"token_ids": list(req.output_ids), "text": "".join(texts[id(req)]), "stats": req.stats.to_dict(),
                     "timing": asdict(timing), "tpot_s": timing.tpot_s})
    return rows


class _Run:
    """One bench session: the loaded pipeline, peers, meter and journal, and the loop over units."""

    def __init__(self, cfg: BenchConfig, progress: Progress | None) -> None:
        for d in cfg.decoders:
            if d not in DECODERS:
                raise MtadError(f"unknown decoder '{d}' (choose from {', '.join(DECODERS)})")
        self.cfg, self.progress = cfg, progress
        self.items = prompts.load(cfg.prompts, cfg.n)
        if not self.items:
            raise MtadError(f"prompt set '{cfg.prompts}' is empty")
        self.humaneval = all("entry_point" in p.meta for p in self.items)
        self.stops = HUMANEVAL_STOPS if self.humaneval else ()
        self.systems = tuple(cfg.decoders) + tuple(PEER_PREFIX + p for p in cfg.peers)
        self.units = interleave.plan([p.id for p in self.items], self.systems, cfg.seeds, cfg.seed, cfg.concurrency)

    def generate(self, journal: Journal) -> tuple[str, str]:
        cfg = self.cfg
        pipe = Pipeline.load(cfg.engines, backend=cfg.backend, device=cfg.device, threads=cfg.threads,
                             load_draft=any(d != "ar" for d in cfg.decoders), max_batch=cfg.concurrency,
                             spec_policy=cfg.spec_policy,
                             # off: every system and seed re-runs the same prompts, and a prefill the
                             # first one paid must not be skipped by the ones after it
                             prefix_cache_mb=0)
        self.encoded = [pipe.encode(p.text, chat=p.chat) for p in self.items]
        self.tokenizer = pipe.tokenizer
        backend = pipe.backend
        peers: dict[str, object] = {}
        meter = None
        try:
            on_gpu = backend.endswith("cuda")
            sync = None
            if on_gpu:
                import torch

                sync = torch.cuda.synchronize  # queued GPU work must land inside the measured window
            meter = energy.open_meter(cfg.energy, device="cuda" if on_gpu else "cpu", sync=sync)
            todo = [(u, s) for u in self.units for s in u.order if not journal.done(s, u.index)]
            if todo:
                from mtad_trt.bench.peers import open_peer

                for p in cfg.peers:  # refuse before any generation, not an hour into the run
                    peers[PEER_PREFIX + p] = open_peer(p, cfg)
                # the meter, and why it cannot measure if so, once per session (not once per window)
                journal.add_session({"backend": backend, "energy_method": meter.method})
            total = sum(len(u.jobs) for u in self.units) * len(self.systems)
            done = total - sum(len(u.jobs) for u, _ in todo)
            self._tick("generate", done, total)
            warm = {s for _, s in todo}
            for system in self.systems:
                if system in warm:
                    self._warm(pipe, peers, system)
            for unit, system in todo:
                gens, window = self._unit(pipe, peers, meter, unit, system)
                journal.commit_unit(system, unit.index, gens, window)
                done += len(unit.jobs)
                self._tick("generate", done, total)
            return backend, meter.method
        finally:
            for peer in peers.values():
                peer.close()
            if meter is not None:
                meter.close()
            pipe.close()  # free the generating engines before a float32 scorer loads

    def _tick(self, phase: str, done: int, total: int) -> None:
        if self.progress:
            self.progress(phase, done, total)

    def _warm(self, pipe, peers, system: str) -> None:
        for w in range(self.cfg.warmup):
            ids = self.encoded[w % len(self.encoded)]
            if system in peers:
                peers[system].generate(ids, self.cfg.seed, max_new=8)
            else:
                run_requests(pipe, [(ids, _settings(self.cfg, system, self.cfg.seed, self.stops) | {"max_new_tokens": 8})])

    def _unit(self, pipe, peers, meter, unit: interleave.Unit, system: str) -> tuple[list[dict], dict]:
        """One (system, unit) inside one timing/energy window."""
        meter.start()
        t0 = time.perf_counter()
        if system in peers:
            rows = [peers[system].generate(self.encoded[j.prompt_index], j.seed) for j in unit.jobs]
        else:
            jobs = [(self.encoded[j.prompt_index], _settings(self.cfg, system, j.seed, self.stops)) for j in unit.jobs]
            rows = run_requests(pipe, jobs)
        window_s = time.perf_counter() - t0
        reading = meter.stop()
        gens = []
        for j, row in zip(unit.jobs, rows, strict=True):
            gens.append({"prompt_id": j.prompt_id, "prompt_index": j.prompt_index, "seed": j.seed,
                         "seed_index": j.seed_index, **row})
        tokens = sum(len(r["token_ids"]) if "stats" in r else r["generated_tokens"] for r in rows)
        window = {"window_s": window_s, "tokens": tokens, "requests": len(rows), "joules": reading.joules}
        if not isinstance(meter, energy.NullMeter):  # an unavailable meter's reason is in the session line
            e = reading.to_dict()
            if e.get("method") == meter.method:
                del e["method"]  # recorded once, in the session line
            window["energy"] = e
        if system in peers:
            window["note"] = peers[system].note
        return gens, window

    def score(self, journal: Journal, tokenizer_of_run) -> None:
        """Quality of every unscored output of our decoders, outside every timed window."""
        cfg = self.cfg
        todo = [k for k, g in sorted(journal.gens.items(), key=lambda kv: (kv[1]["unit"], kv[0]))
                if not k[0].startswith(PEER_PREFIX) and k not in journal.scores]
        total = sum(1 for k in journal.gens if not k[0].startswith(PEER_PREFIX))
        self._tick("score", total - len(todo), total)
        if not todo:
            return
        scorer = Pipeline.load(cfg.score_engines or cfg.engines, backend=cfg.backend, device=cfg.device,
                               threads=cfg.score_threads or cfg.threads, load_draft=False, prefix_cache_mb=0)
        try:
            if tokenizer_of_run is not None and scorer.tokenizer.get_vocab() != tokenizer_of_run.get_vocab():
                raise MtadError(f"{cfg.score_engines} uses another tokenizer than {cfg.engines}: cannot score with it")
            encoded = [scorer.encode(p.text, chat=p.chat) for p in self.items]
            for i, key in enumerate(todo):
                t0 = time.perf_counter()
                g = journal.gens[key]
                lp = scorer.score(encoded[g["prompt_index"]], g["token_ids"])
                rec = {"scored_tokens": len(lp), "logprob_sum": float(lp.sum()),
                       "mean_logprob": float(lp.mean()) if len(lp) else None}
                if self.humaneval:
                    from mtad_trt.bench.sandbox import check_correctness

                    r = check_correctness(self.items[g["prompt_index"]].meta, g["text"], timeout_s=5.0)
                    rec.update(passed=r.passed, sandbox_status=r.status)
                rec["score_s"] = time.perf_counter() - t0
                journal.add_score(key, rec)
                self._tick("score", total - len(todo) + i + 1, total)
        finally:
            scorer.close()


def run_bench(cfg: BenchConfig, progress: Progress | None = None) -> dict:
    run = _Run(cfg, progress)
    journal = Journal(cfg.out, fingerprint(cfg), resume=cfg.resume)
    try:
        backend, energy_method = run.generate(journal)
        run.score(journal, run.tokenizer)
        results, paired = build_results(journal, run.systems, cfg.n_boot)
        times = run_time(journal)
    finally:
        journal.close()
    return _record(cfg, backend, energy_method, results, paired, run, journal, times)


def _record(cfg: BenchConfig, backend: str, energy_method: str, results: dict, paired: dict, run: _Run,
            journal: Journal, times: dict) -> dict:
    import onnxruntime

    manifest = Path(cfg.engines) / "manifest.json"
    return {
        "record_version": RECORD_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "gpu": _gpu_name()},
        # torch and transformers as installed (None where absent), read without importing them
        "versions": {"mtad_trt": mtad_trt.__version__, "onnxruntime": onnxruntime.__version__,
                     "torch": _installed("torch"), "transformers": _installed("transformers")},
        "backend": backend,
        "engine_manifest_sha256": sha256_file(manifest),
        "energy_method": energy_method,
        "settings": asdict(cfg),
        "interleaving": interleave.describe(cfg.concurrency),
        "units": len(run.units),
        # bench.json holds the summaries; every generation (token ids, text, stats, timing), timing
        # window and score is in the journal beside it, one JSON object per line
        "journal": {"path": str(journal.path), "file": JOURNAL, "resumed_records": journal.resumed,
                    "holds": "every gen, window, score and session record; bench.json keeps only the summaries"},
        "run_time": times,
        "results": results,
        "paired": paired,
    }


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpu_name() -> str | None:
    """CUDA device 0's name as torch reports it; torch is imported only where it may see a GPU
    (`backends.cuda_available`), so a CPU run stays torch-free."""
    try:
        from mtad_trt.backends import cuda_available

        if not cuda_available():
            return None
        import torch

        return torch.cuda.get_device_name(0)
    except Exception:
        return None
