#!/usr/bin/env python3
"""The GPU check: parities and step times of the default pair's shapes, in one JSON (docs/gpu.md).

    bash scripts/gpu_check.sh                                # a lent GPU machine, one call, < 10 min
    python3 scripts/gpu_check.py --device cpu --out /tmp/x   # dry run: torch path, tiny shapes

Models are random-weight Qwen2 with the default pair's configs, built on the machine: no weights
travel and no registry is reached. Phases, each recorded (or its skip reason) in gpu_check.json,
which is rewritten after every phase so a timed-out call still leaves what it measured:

  env      versions, GPU, whether `tensorrt` imports
  pytest   `pytest -m gpu` on the device tests
  torch    per model and dtype: CUDA graphs vs eager over T=1, 2, 1 with a prefill between decodes
           and one bucket growth, at one row and at 4 rows of different lengths; step times per
           (rows, T), graphs off and on, each timed step's logits compared between the two
  trt      where `tensorrt` imports: export (fp16), build, TensorRT eager vs ONNX Runtime on CPU,
           TensorRT graphs vs TensorRT eager over the same sequences (1 and 4 rows); step times
  estimate first tokens/s per decoder: these step costs x tokens per target call measured on
           CPU, read from the bench records docs/results.md cites (ACCEPTANCE_FILES)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The default pair (export/registry.py, docs/results.md). Qwen2Config's own defaults are a 7B-class
# model (hidden 4096, 32 layers, 32 KV heads), so every shape field is set here. Upstream
# config.json of both Qwen2.5-Coder models says tied embeddings; the 0.5B GGUF the registry pins
# carries a separate LM head (its converted folder's config says so), so the draft is built untied. The LM head
# costs the same either way; only the weight memory differs.
COMMON = {"max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "hidden_act": "silu"}
PAIR = {
    "draft": {"model": "Qwen2.5-Coder-0.5B-Instruct", "num_hidden_layers": 24, "hidden_size": 896,
              "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2,
              "vocab_size": 151936, "tie_word_embeddings": False},
    "target": {"model": "Qwen2.5-Coder-1.5B-Instruct", "num_hidden_layers": 28, "hidden_size": 1536,
               "intermediate_size": 8960, "num_attention_heads": 12, "num_key_value_heads": 2,
               "vocab_size": 151936, "tie_word_embeddings": True},
}
TINY = {role: {**cfg, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 320} for role, cfg in PAIR.items()}

MAX_SEQ_LEN = 1024  # buckets 128, 256, 512, 1024
MAX_DECODE_TOKENS = 32  # the runtime's default graph width
TIME_BUCKET = 512
SHAPES = [(1, 1), (1, 4), (1, 5), (1, 17), (4, 1), (4, 5)]  # (rows, T): decode, MTAD draft level, verify, MMTAD tree, batched

# Tokens per target call measured on CPU: the bench records of docs/results.md §3 (issue 13: int4
# default pair, T=1, top-k 10, top-p 0.9, γ=4, B=4; all 164 HumanEval problems, 40 prose openings x
# 2 seeds). Read at start, not copied here, so the estimate follows the newest run the docs cite;
# a rerun that replaces them updates these paths and docs/results.md together.
ACCEPTANCE_FILES = {
    "humaneval": "docs/data/issue13/humaneval-164/bench.json",
    "prose": "docs/data/issue13/prose-40x2/bench.json",
}
DECODERS = ("ar", "sps", "mtad", "mmtad")
BATCH_ROWS = max(r for r, _ in SHAPES)  # the batched parity runs at the widest timed batch
GRAPHS_VS_EAGER_TOL = 1e-2  # relative to max |logit|: same kernels, so any real difference is a bug
TRT_VS_ORT_TOL = 5e-2  # fp16 plan vs ONNX Runtime's CPU kernels on the same fp16 graph (a first guess)


class AcceptanceDataError(RuntimeError):
    """The bench records the estimate reads are missing or do not hold what it needs."""


def read_bench(path: Path) -> dict[str, Any]:
    """One bench record (`mtad-trt bench`'s bench.json), or AcceptanceDataError saying what to do."""
    if not path.is_file():
        raise AcceptanceDataError(
            f"missing {path}: the speed estimate reads tokens per target call from the bench records "
            "docs/results.md cites (ACCEPTANCE_FILES in scripts/gpu_check.py); restore them "
            "(`git checkout -- docs/data`) or leave `estimate` out of --phases")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AcceptanceDataError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def tokens_per_call(record: dict[str, Any], path: Path) -> dict[str, float]:
    """{decoder: tokens per target call} for every decoder the estimate prices."""
    results = record.get("results", {})
    out = {}
    for decoder in DECODERS:
        value = results.get(decoder, {}).get("summary", {}).get("tokens_per_target_call")
        if not isinstance(value, (int, float)) or value < 1:
            raise AcceptanceDataError(f"{path} has no tokens_per_target_call for decoder {decoder!r} "
                                      f"(decoders there: {', '.join(results) or 'none'})")
        out[decoder] = float(value)
    return out


def load_acceptance(files: dict[str, str] | None = None, root: Path = ROOT) -> dict[str, Any]:
    """Tokens per target call per prompt set and decoder, the γ and beam width they were measured
    with (which fix the graph calls of a round), and where they came from."""
    files = ACCEPTANCE_FILES if files is None else files
    acc: dict[str, Any] = {"tokens_per_target_call": {}, "sources": {}}
    shapes = set()
    for prompts, rel in files.items():
        path = root / rel
        record = read_bench(path)
        settings = record.get("settings", {})
        shape = (settings.get("gamma"), settings.get("beam_width"))
        if not all(isinstance(v, int) and v >= 1 for v in shape):
            raise AcceptanceDataError(f"{path} records no gamma / beam_width settings")
        shapes.add(shape)
        acc["tokens_per_target_call"][prompts] = tokens_per_call(record, path)
        acc["sources"][prompts] = {"path": rel, "created": record.get("created"), "n": settings.get("n"),
                                   "seeds": settings.get("seeds"), "backend": record.get("backend")}
    if len(shapes) != 1:
        raise AcceptanceDataError(f"the bench records disagree on (gamma, beam_width): {sorted(shapes)}")
    acc["gamma"], acc["beam_width"] = shapes.pop()
    missing = {(r, t) for rnd in rounds(acc["gamma"], acc["beam_width"]).values() for _, r, t in rnd["calls"]} - set(SHAPES)
    if missing:
        raise AcceptanceDataError(f"γ={acc['gamma']}, B={acc['beam_width']} in the bench records need step shapes "
                                  f"{sorted(missing)} that SHAPES does not time")
    return acc


def rounds(gamma: int, beams: int) -> dict[str, dict[str, Any]]:
    """Graph calls of one round (decoders/draft.py, sps.py, mtad.py): (model, rows, T), and sampled rows."""
    return {
        "ar": {"calls": [("target", 1, 1)], "sampled_rows": 1},
        "sps": {"calls": [("draft", 1, 1)] * gamma + [("target", 1, gamma + 1)], "sampled_rows": gamma + gamma + 1},
        "mtad": {"calls": [("draft", 1, 1)] + [("draft", 1, beams)] * (gamma - 1) + [("target", 1, gamma + 1)],
                 "sampled_rows": 1 + beams * (gamma - 1) + gamma + 1},
        "mmtad": {"calls": [("draft", 1, 1)] + [("draft", 1, beams)] * (gamma - 1) + [("target", 1, 1 + beams * gamma)],
                  "sampled_rows": 1 + beams * (gamma - 1) + 1 + beams * gamma},
    }


class Check:
    """The JSON record, written after every phase."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.start, self.budget_s = out, time.monotonic(), budget_s
        self.data: dict[str, Any] = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "failures": [], "phases": {}}
        self.path = out / "gpu_check.json"

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def fail(self, what: str) -> None:
        print(f"FAIL: {what}", flush=True)
        self.data["failures"].append(what)

    def phase(self, name: str, fn: Any, *args: Any, need_s: float = 0.0) -> Any:
        if self.left() < need_s:
            self.data["phases"][name] = {"skipped": f"budget: {self.left():.0f} s left, needs ~{need_s:.0f}"}
            print(f"-- {name}: skipped (budget)", flush=True)
            self.save()
            return None
        print(f"-- {name}", flush=True)
        t0 = time.monotonic()
        try:
            result = fn(*args)
            self.data["phases"][name] = {"seconds": round(time.monotonic() - t0, 1), **(result or {})}
        except Exception as e:  # a phase that breaks is a finding, not the end of the check
            self.data["phases"][name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            self.fail(f"{name}: {type(e).__name__}: {e}")
            result = None
        self.save()
        return result


# -- models and step sequences -----------------------------------------------------------------
def make_model(cfg: dict[str, Any], dtype: Any, device: str, layers: int | None = None) -> Any:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    fields = {k: v for k, v in cfg.items() if k != "model"}
    if layers:
        fields["num_hidden_layers"] = layers
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**COMMON, **fields))
    return model.to(dtype).eval()


def sequence(runner: Any, vocab: int, seed: int = 0) -> list[np.ndarray]:
    """Decode T=1, 2, 1 with a prefill between decodes and one bucket growth: the steps that replay
    a graph after another key (and the other profile) ran. Returns each step's logits."""
    from mtad_trt.backends.rows import Row

    rng = np.random.default_rng(seed)
    row, out = Row(runner), []

    def fwd(t: int) -> None:
        out.append(row.forward(rng.integers(0, vocab, t), logits_rows=range(min(t, 4))).copy())
        row.commit_chain(t)

    fwd(40)  # prefill: T > max_decode_tokens, never captured
    for t in (1, 1, 1, 2, 2, 2, 1, 1):  # T=1 is captured on its 2nd use and replayed after T=2 ran
        fwd(t)
    fwd(48)  # a prefill between decodes
    for t in (1, 2, 1):
        fwd(t)
    runner.reserve(200)  # bucket growth 128 -> 256: new keys
    for t in (1, 1, 1, 2, 1, 1):
        fwd(t)
    return out


def batched_sequence(runner: Any, vocab: int, rows: int = BATCH_ROWS, seed: int = 1) -> list[np.ndarray]:
    """`rows` sequences stepped together, each keeping a different number of tokens per step, so
    the rows differ in length and position: a prefill, T=1 (captured, replayed), T=5 verifies, T=2,
    a bucket growth, T=1 again. The timed 4-row shapes (4x1, 4x5) are among them. Returns each
    step's logits [rows, K, V] for the last K <= 4 tokens of every row."""
    from mtad_trt.backends.rows import fill_row
    from mtad_trt.contract import StepInputs, as_step_out

    rng = np.random.default_rng(seed)
    n, out = [0] * rows, []

    def step(t: int, keep: list[int]) -> None:
        s, k = runner.reserve(max(n) + t), min(t, 4)
        inp = StepInputs.zeros(rows, t, k, s, window=runner.spec.window)
        for r in range(rows):
            fill_row(inp, r, n[r], rng.integers(0, vocab, t), None, None, range(t - k, t))
        out.append(np.array(as_step_out(runner.step(inp), vocab).logits, copy=True))
        for r in range(rows):  # a verify keeps a prefix of its chain: row r its first keep[r] tokens
            runner.keep(r, np.arange(keep[r]), np.arange(n[r], n[r] + keep[r]))
            n[r] += keep[r]

    step(40, [40 - 3 * r for r in range(rows)])  # prefill (T > max_decode_tokens: uncaptured)
    for t in (1, 1, 1):
        step(t, [1] * rows)
    for _ in range(2):
        step(5, [1 + r % 5 for r in range(rows)])
    step(2, [2] * rows)
    runner.reserve(200)  # bucket growth 128 -> 256: new keys
    for t in (1, 1, 1):
        step(t, [1] * rows)
    return out


def compare(got: list[np.ndarray], want: list[np.ndarray]) -> dict[str, Any]:
    """max |Δ| over all steps, relative to max |want|, and greedy (top-1) agreement per logits row."""
    diff = max(float(np.abs(a - b).max()) for a, b in zip(got, want, strict=True))
    scale = max(float(np.abs(b).max()) for b in want)
    top = np.concatenate([(a.argmax(-1) == b.argmax(-1)).ravel() for a, b in zip(got, want, strict=True)])
    finite = all(np.isfinite(a).all() for a in got)
    return {"max_abs_diff": diff, "max_abs_ref": scale, "rel_diff": diff / max(scale, 1e-30),
            "top1_agreement": float(top.mean()), "finite": finite, "steps": len(got)}


def time_steps(runner: Any, rows: int, t: int, repeat: int) -> tuple[dict[str, float], np.ndarray]:
    """ms per step() at bucket TIME_BUCKET (or the largest that fits): host copy-in, graph call or
    replay, logits to the host and the stream synchronised — what a decoder waits for. Also the
    last timed step's logits, so graphs on can be compared with graphs off at every timed shape."""
    from mtad_trt.backends.rows import fill_row
    from mtad_trt.contract import StepInputs, as_step_out

    runner.reset()
    s = runner.reserve(min(TIME_BUCKET, runner.spec.max_seq_len))
    inp = StepInputs.zeros(rows, t, t, s)
    rng = np.random.default_rng(0)
    for r in range(rows):
        fill_row(inp, r, s // 2, rng.integers(0, runner.spec.vocab_size, t), None, None, range(t))
    for _ in range(3):  # warm-up, warm-up + capture, first replay
        runner.step(inp)
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = runner.step(inp)
        times.append(1000 * (time.perf_counter() - t0))
    logits = np.array(as_step_out(out, runner.spec.vocab_size).logits, copy=True)
    return {"ms": statistics.median(times), "min_ms": min(times), "bucket": s}, logits


def timings(make_runner: Any, repeat: int) -> dict[str, Any]:
    """{"graphs_on"/"graphs_off": {"rows x T": {...}}, "graphs_vs_eager": {"rows x T": compare}},
    one runner per (rows, graphs); every timed step's logits, graphs on against graphs off."""
    out: dict[str, Any] = {}
    logits: dict[bool, dict[str, np.ndarray]] = {False: {}, True: {}}
    for graphs in (False, True):
        table = {}
        for rows in sorted({r for r, _ in SHAPES}):
            runner = make_runner(rows, graphs)
            for r, t in SHAPES:
                if r == rows:
                    table[f"{r}x{t}"], logits[graphs][f"{r}x{t}"] = time_steps(runner, r, t, repeat)
            stats = getattr(runner, "graph_stats", {})
            table[f"graph_stats_rows{rows}"] = dict(stats)
            runner.close()
        out["graphs_on" if graphs else "graphs_off"] = table
    out["graphs_vs_eager"] = {shape: compare([logits[True][shape]], [logits[False][shape]]) for shape in logits[False]}
    return out


def require(check: Check, what: str, parity: dict[str, Any], tol: float) -> None:
    """A failure when a comparison is non-finite or differs by more than `tol` (relative)."""
    if not parity["finite"] or parity["rel_diff"] > tol:
        finite = "" if parity["finite"] else " (non-finite logits)"
        check.fail(f"{what} rel diff {parity['rel_diff']:.3g}{finite}")


def require_timed(check: Check, what: str, steps: dict[str, Any]) -> None:
    for shape, parity in steps["graphs_vs_eager"].items():
        require(check, f"{what} timed step {shape}: graphs vs eager", parity, GRAPHS_VS_EAGER_TOL)


# -- phases --------------------------------------------------------------------------------------
def phase_env(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime
    import torch
    import transformers

    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
                           "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
                           "device": args.device}
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch sees no CUDA GPU (is the CUDA build of torch installed?)")
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        env["bf16"] = torch.cuda.is_bf16_supported()
    try:
        from mtad_trt.backends.trt_plans import import_tensorrt

        env["tensorrt"] = import_tensorrt().__version__
    except Exception as e:
        env["tensorrt"] = None
        env["tensorrt_missing"] = str(e)
    return env


def phase_pytest(check: Check) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           "tests/test_torch_backend.py", "tests/test_cuda_graphs.py", "tests/test_trt.py"]
    limit = max(30.0, min(240.0, check.left() - 240))
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        check.fail(f"pytest -m gpu: timed out after {limit:.0f} s")
        return {"rc": None, "timed_out": True}
    tail = (p.stdout + p.stderr)[-2500:]
    if p.returncode != 0:
        check.fail(f"pytest -m gpu: rc {p.returncode}")
    return {"rc": p.returncode, "tail": tail}


def phase_torch(check: Check, args: argparse.Namespace, role: str, dtype_name: str) -> dict[str, Any]:
    import torch

    from mtad_trt.backends.device import TORCH_DTYPES
    from mtad_trt.backends.torch_backend import TorchRunner
    from mtad_trt.contract import spec_from_model

    dtype = TORCH_DTYPES[dtype_name]
    if args.device == "cuda":
        torch.cuda.empty_cache()
    cfg = (TINY if args.device == "cpu" else PAIR)[role]
    model = make_model(cfg, dtype, args.device)
    spec = spec_from_model(model, dtype_name, MAX_SEQ_LEN)

    def make(rows: int, graphs: bool) -> TorchRunner:
        return TorchRunner(model, spec, device=args.device, batch=rows, dtype=dtype_name, cuda_graphs=graphs,
                           max_decode_tokens=MAX_DECODE_TOKENS)

    what = f"torch {role} {dtype_name}"
    eager, graphed = make(1, False), make(1, True)
    parity = compare(sequence(graphed, spec.vocab_size), sequence(eager, spec.vocab_size))
    stats = dict(graphed.graph_stats)
    eager.close()
    graphed.close()
    eager, graphed = make(BATCH_ROWS, False), make(BATCH_ROWS, True)
    batched = compare(batched_sequence(graphed, spec.vocab_size), batched_sequence(eager, spec.vocab_size))
    batched_stats = dict(graphed.graph_stats)
    eager.close()
    graphed.close()
    require(check, f"{what}: graphs vs eager", parity, GRAPHS_VS_EAGER_TOL)
    require(check, f"{what}: {BATCH_ROWS} rows, graphs vs eager", batched, GRAPHS_VS_EAGER_TOL)
    for label, st in (("", stats), (f" ({BATCH_ROWS} rows)", batched_stats)):
        if st.get("capture_failures"):
            check.fail(f"{what}: {st['capture_failures']} capture failures{label}")
    steps = timings(make, args.repeat)
    require_timed(check, what, steps)
    result = {"model": cfg["model"], "layers": cfg["num_hidden_layers"], "dtype": dtype_name,
              "graphs_vs_eager": parity, "graph_stats": stats, f"graphs_vs_eager_rows{BATCH_ROWS}": batched,
              f"graph_stats_rows{BATCH_ROWS}": batched_stats, "steps": steps}
    return result  # the model goes with this frame; the next phase's empty_cache returns its memory


def phase_trt(check: Check, args: argparse.Namespace, role: str, work: Path) -> dict[str, Any]:
    """fp16 export of a random model (full widths and vocabulary, --trt-layers deep), a plan, and
    the three comparisons. ONNX Runtime runs the same fp16 graph on the CPU."""
    import torch

    from mtad_trt.backends.ort import OrtRunner
    from mtad_trt.backends.trt import TrtRunner
    from mtad_trt.contract import spec_from_model
    from mtad_trt.export.build_trt import build_plans
    from mtad_trt.export.role import export_onnx
    from mtad_trt.folder.manifest import Manifest, RoleEntry

    cfg = (TINY if args.device == "cpu" else PAIR)[role]  # cpu: only under the test suite's fake tensorrt
    layers = args.trt_layers or cfg["num_hidden_layers"]
    folder = work / f"trt-{role}"
    model = make_model(cfg, torch.float16, "cpu", layers)
    spec = spec_from_model(model, "float16", MAX_SEQ_LEN)
    t0 = time.monotonic()
    export_onnx(model, spec, folder / role / "model.onnx")
    export_s = time.monotonic() - t0
    del model
    Manifest(roles={role: RoleEntry(spec=spec, onnx=f"{role}/model.onnx")}).save(folder)
    t0 = time.monotonic()
    entry = build_plans(folder, precision="fp16", max_batch=max(r for r, _ in SHAPES), max_seq_len=MAX_SEQ_LEN,
                        max_decode_tokens=MAX_DECODE_TOKENS, max_prefill_tokens=256,
                        decode_opt_tokens=args.decode_opt_tokens)[role]
    build_s = time.monotonic() - t0
    manifest = Manifest.load(folder)

    def make(rows: int, graphs: bool) -> TrtRunner:
        return TrtRunner.from_folder(folder, manifest, role, batch=rows, cuda_graphs=graphs, device=args.device)

    parities: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    contexts: dict[str, int] = {}  # the graphed runner's: one per graph key, plus one for the prefills
    for rows, drive, suffix in ((1, sequence, ""), (BATCH_ROWS, batched_sequence, f"_rows{BATCH_ROWS}")):
        ort = OrtRunner(folder / role / "model.onnx", spec, threads=min(8, os.cpu_count() or 1), batch=rows)
        ref = drive(ort, spec.vocab_size)
        ort.close()
        eager, graphed = make(rows, False), make(rows, True)
        trt_eager = drive(eager, spec.vocab_size)
        parities[f"eager_vs_ort_cpu{suffix}"] = compare(trt_eager, ref)
        parities[f"graphs_vs_eager{suffix}"] = compare(drive(graphed, spec.vocab_size), trt_eager)
        stats[f"graph_stats{suffix}"] = dict(graphed.graph_stats)
        contexts[f"contexts{suffix}"] = graphed.contexts_created
        eager.close()
        graphed.close()
    for key, parity in parities.items():
        tol = TRT_VS_ORT_TOL if key.startswith("eager_vs_ort") else GRAPHS_VS_EAGER_TOL
        require(check, f"trt {role}: {key.replace('_', ' ')}", parity, tol)
    for key, st in stats.items():
        if st.get("capture_failures"):
            check.fail(f"trt {role}: {st['capture_failures']} capture failures ({key})")
    steps = timings(make, args.repeat)
    require_timed(check, f"trt {role}", steps)
    return {"model": cfg["model"], "layers": layers, "full_depth": layers == cfg["num_hidden_layers"],
            "dtype": "float16", "tensorrt": entry["tensorrt_version"], "export_s": round(export_s, 1),
            "build_s": round(build_s, 1), "decode_opt_tokens": args.decode_opt_tokens,
            **parities, **stats, **contexts, "steps": steps}


def host_sampling_ms(vocab: int, repeat: int = 20) -> float:
    """ms to turn one row of logits into probabilities with the default settings (host work per row)."""
    from mtad_trt.engine.params import SamplingParams
    from mtad_trt.engine.sampling import process

    logits = np.random.default_rng(0).normal(size=(1, vocab)).astype(np.float32)
    sp = SamplingParams()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        process(logits, sp)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def estimate(check: Check, args: argparse.Namespace, acceptance: dict[str, Any]) -> dict[str, Any]:
    """tokens/s per decoder = tokens per target call (CPU acceptance, `load_acceptance`) / cost of
    one round, where a round's cost sums its graph calls' measured step times (graphs on) and its
    host sampling."""
    phases = check.data["phases"]
    vocab = (TINY if args.device == "cpu" else PAIR)["target"]["vocab_size"]
    proc = host_sampling_ms(vocab)
    sources = {}
    for dtype in args.dtypes:
        d, t = phases.get(f"torch/draft/{dtype}", {}), phases.get(f"torch/target/{dtype}", {})
        if "steps" in d and "steps" in t:
            sources[f"torch {dtype}"] = {"draft": d["steps"]["graphs_on"], "target": t["steps"]["graphs_on"]}
    d, t = phases.get("trt/draft", {}), phases.get("trt/target", {})
    if d.get("full_depth") and t.get("full_depth"):
        sources["trt fp16"] = {"draft": d["steps"]["graphs_on"], "target": t["steps"]["graphs_on"]}
    table: dict[str, Any] = {"host_sampling_ms_per_row": proc, "acceptance": acceptance, "rows": []}
    for name, steps in sources.items():
        for decoder, rnd in rounds(acceptance["gamma"], acceptance["beam_width"]).items():
            gpu_ms = sum(steps[model][f"{r}x{w}"]["ms"] for model, r, w in rnd["calls"])
            round_ms = gpu_ms + proc * rnd["sampled_rows"]
            for prompts, acc in acceptance["tokens_per_target_call"].items():
                table["rows"].append({"backend": name, "decoder": decoder, "prompts": prompts,
                                      "tokens_per_target_call": acc[decoder], "graph_ms_per_round": round(gpu_ms, 3),
                                      "round_ms": round(round_ms, 3), "tokens_per_s": round(1000 * acc[decoder] / round_ms, 1)})
    print_estimate(table, args)
    return table


def print_estimate(table: dict[str, Any], args: argparse.Namespace) -> None:
    note = " (DRY RUN on CPU with tiny models: not a GPU estimate)" if args.device == "cpu" else ""
    sources = ", ".join(src["path"] for src in table["acceptance"]["sources"].values())
    print(f"\nFirst GPU speed estimate{note}: step times measured here (graphs on, bucket {TIME_BUCKET}) x tokens per")
    print(f"target call measured on CPU (docs/results.md §3: {sources}); host sampling "
          f"{table['host_sampling_ms_per_row']:.2f} ms/row included.")
    print(f"{'backend':<14}{'decoder':<8}{'prompts':<11}{'tok/call':>9}{'graph ms':>10}{'round ms':>10}{'tok/s':>9}")
    for r in table["rows"]:
        print(f"{r['backend']:<14}{r['decoder']:<8}{r['prompts']:<11}{r['tokens_per_target_call']:>9.2f}"
              f"{r['graph_ms_per_round']:>10.2f}{r['round_ms']:>10.2f}{r['tokens_per_s']:>9.1f}")


def run_trt(check: Check, args: argparse.Namespace, phases: set[str], env: dict | None, dry: bool) -> None:
    if "trt" not in phases:
        return
    if dry or not (env or {}).get("tensorrt"):
        why = "dry run" if dry else f"tensorrt does not import: {(env or {}).get('tensorrt_missing')}"
        check.data["phases"]["trt"] = {"skipped": why}
        return
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        for role in ("draft", "target"):
            check.phase(f"trt/{role}", phase_trt, check, args, role, Path(work), need_s=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu = dry run (torch only, tiny models)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check-out")))
    ap.add_argument("--phases", default="env,pytest,torch,trt,estimate")
    ap.add_argument("--dtypes", default=None, help="torch dtypes (default float16,bfloat16 on cuda; float32 on cpu)")
    ap.add_argument("--trt-layers", type=int, default=4,
                    help="decoder layers of the TensorRT models (full widths and vocabulary); 0 = full depth")
    ap.add_argument("--decode-opt-tokens", type=int, default=None, help="passed to the build (docs/gpu.md, item 7)")
    ap.add_argument("--repeat", type=int, default=None, help="timed steps per shape (default 30; 3 on cpu)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="phases that would not fit are skipped")
    args = ap.parse_args()
    dry = args.device == "cpu"
    args.dtypes = (args.dtypes or ("float32" if dry else "float16,bfloat16")).split(",")
    args.repeat = args.repeat or (3 if dry else 30)
    phases = set(args.phases.split(","))
    acceptance = None
    if "estimate" in phases:  # before any GPU time is spent: the estimate cannot run without it
        try:
            acceptance = load_acceptance()
        except AcceptanceDataError as e:
            print(f"gpu_check: {e}", file=sys.stderr, flush=True)
            return 2
    if dry:
        import torch

        torch.set_num_threads(1)  # tiny models: more threads only contend (2-core CI machines)
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.budget_s)
    check.data["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    check.data["configs"] = {"common": COMMON, **(TINY if dry else PAIR)}

    env = check.phase("env", phase_env, args) if "env" in phases else None
    if env is None and "env" in phases:
        return 1
    if "pytest" in phases:
        if dry:
            check.data["phases"]["pytest"] = {"skipped": "dry run (the gpu tests skip without CUDA)"}
        else:
            check.phase("pytest", phase_pytest, check, need_s=60)
    torch_dtypes = args.dtypes if "torch" in phases else []
    for i, dtype in enumerate(torch_dtypes):  # the first dtype, then TensorRT, then the other dtypes
        for role in ("draft", "target"):
            check.phase(f"torch/{role}/{dtype}", phase_torch, check, args, role, dtype, need_s=45)
        if i == 0:
            run_trt(check, args, phases, env, dry)
    if not torch_dtypes:
        run_trt(check, args, phases, env, dry)
    if acceptance is not None:
        check.phase("estimate", estimate, check, args, acceptance)
    check.save()
    print(f"\nwrote {check.path}; failures: {len(check.data['failures'])}", flush=True)
    for f in check.data["failures"]:
        print(f"  {f}")
    return 1 if check.data["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
