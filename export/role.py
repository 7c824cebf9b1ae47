"""One model (draft or target) -> `<role>/model.onnx` + its external data, streamed and checked.

Stages, each timed with its own peak RSS in the manifest (`RoleEntry.export`):

1. **graph + weights**: the model is built on the meta device and traced (no weights in memory);
   every weight is then read from the checkpoint one block of rows at a time, converted or
   quantized, and written (`weights.py`). Peak memory is set by one block, not by the model.
2. **truncated parity**: the same path exports the checkpoint cut to its first layers (and, when
   the embedding is large, its first vocabulary rows) as a float32 graph (a float32 export whose
   cut keeps the whole model checks its finished graph instead), which must match
   transformers loaded with the same cut *exactly as the full float models used to*: short and
   long cases, decode steps, trees, the largest S bucket, past every sliding window
   (`parity.check_parity`). This is what catches graph and weight-mapping bugs.
3. **reference**: transformers' own modules run the *full* model over a prose sample and a random
   prompt with one decoder layer in memory at a time (`reference.streamed_logits`).
4. **engine check**: the finished graph, run by ONNX Runtime through the runtime's own `Row`, must
   agree with that reference within its precision's tolerance — max |Δlogits| for float32,
   relative error for float16 / bfloat16 / quantized graphs — and its perplexity on the prose
   sample is recorded beside the reference's (what quantization costs).
"""

from __future__ import annotations

import gc
import shutil
import time
from pathlib import Path

import numpy as np
import onnx

from mtad_trt.contract import ModelSpec, spec_from_model, unsupported_feature
from mtad_trt.errors import MtadError
from mtad_trt.export import reference, weights
from mtad_trt.export.onnx_export import meta_model, rename_dims, trace
from mtad_trt.export.parity import check_parity, failure_line, reference_cases
from mtad_trt.export.progress import Eta, Say, size_text, stage
from mtad_trt.export.tensors import TensorSource
from mtad_trt.folder.manifest import RoleEntry, sha256_file

FLOAT_TOLERANCE = 1e-3  # max |Δlogits| of a float32 engine against the streamed reference
# Relative error (reference.relative_error) allowed; measured values are in docs/export.md. A wrongly
# mapped weight gives errors of order 0.5-1; float-activation int4 graphs measured ~1e-6.
RELATIVE_TOLERANCE = {"float16": 0.02, "bfloat16": 0.05, "quantized": 1e-3}
PPL_WARN_RATIO = 1.15  # warn when quantization costs more than 15% perplexity
REFERENCE_TOKENS = 192  # prose tokens of the engine check

# A fixed English sample for the engine check (original text, written for this project).
PROSE = (
    "The harbour was quiet in the early morning. Fishing boats rocked gently at their moorings while "
    "gulls circled above the market, where traders were setting out crates of ice and the first catch "
    "of the day. A baker opened her shutters and the smell of warm bread drifted down the street. "
    "Most of the town would not wake for another hour, but the people who worked by the sea had "
    "already finished half a day's labour. They spoke little, checked the weather, mended nets and "
    "counted the money they hoped to make before the tourists arrived. In the afternoon the wind "
    "turned, clouds gathered over the hills, and by evening the first storm of the autumn had reached "
    "the coast, sending everyone home early to light their fires and wait for the rain to pass."
)


def build_graph(model, spec: ModelSpec, source: TensorSource, path: Path, opset: int, attention: str,
                quant: str, block_size: int, lm_head: str = "same", say: Say | None = None, label: str = "",
                stages: dict | None = None, embedding: str = "float") -> dict:
    """Trace `model` (meta), bind and stream its weights from `source` into `path` (+ `.data`).
    With `stages`, the two halves are recorded as the stages "graph" and "weights"."""
    from mtad_trt.export.quantize import EMBEDDING, LM_HEAD, SCHEMES, quantize_gathers, quantize_matmuls

    with stage("graph", stages):
        try:
            graph, wrapper = trace(model, spec, opset, attention)
        except MtadError:
            raise
        except Exception as e:
            raise MtadError(f"{label}: ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
        entries = weights.bind(graph, wrapper, model, source)
        entries = weights.fold_transposes(graph, entries)
        if quant != "none":
            entries = quantize_matmuls(graph, entries, SCHEMES[quant], block_size, spec.vocab_size, LM_HEAD[lm_head])
            table_bits = SCHEMES[quant] if EMBEDDING[embedding] is None else EMBEDDING[embedding]
            entries = quantize_gathers(graph, entries, table_bits, block_size, spec.vocab_size)
    need = sum(weights.stored_bytes(e) for e in entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if need + 2**26 > free:
        raise MtadError(f"not enough free disk in {path.parent}: {label} needs {size_text(need)}, {size_text(free)} free")
    eta = Eta(say, f"{label}: weights", unit="params") if say is not None else None
    with stage("weights", stages):
        record = weights.write(graph, entries, source, path, progress=eta)
    record["quantized"] = {e.quant.get("key", e.source): {k: e.quant[k] for k in ("bits", "block_size")}
                           for e in entries if e.quant is not None}
    proto = onnx.load(str(path), load_external_data=False)
    rename_dims(proto, spec)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))  # path form: the data stays on disk
    return record


def export_onnx(model, spec: ModelSpec, path: Path, opset: int = 18, attention: str = "grouped") -> dict:
    """Export a model that is already loaded (its own parameters are the source): same path."""
    from mtad_trt.export.tensors import ModuleSource

    return build_graph(model, spec, ModuleSource(model), Path(path), opset, attention, "none", 0)


def _perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """Token-weighted perplexity of ids[1:] given full logits rows (the project's one definition)."""
    from mtad_trt.engine.scoring import log_softmax, token_weighted_perplexity

    lp = log_softmax(logits[:-1])
    return token_weighted_perplexity([lp[np.arange(len(lp)), ids[1:]]])


def export_role(src, config, source: TensorSource, folder: Path, role: str, dtype: str, max_seq_len: int,
                opset: int, say: Say, quant: str = "none", tokenizer=None, block_size: int = 128,
                lm_head: str = "same", attention: str = "grouped", topk_head: int = 64,
                embedding: str = "float") -> RoleEntry:

    t_all = time.perf_counter()
    stages: dict = {}
    model = meta_model(config, dtype)
    spec = spec_from_model(model, dtype, max_seq_len)
    spec.topk_head = min(topk_head, spec.vocab_size)
    why = unsupported_feature(model, spec.max_seq_len)
    if why is not None:
        raise MtadError(f"{role}: cannot export: {why}")
    path = folder / role / "model.onnx"
    say(f"{role}: {spec.architecture}, {spec.num_layers} layers, vocab {spec.vocab_size}: graph and weights "
        f"({dtype}{'' if quant == 'none' else ', ' + quant})")
    written = build_graph(model, spec, source, path, opset, attention, quant, block_size, lm_head,
                          say, role, stages, embedding)
    del model

    with stage("truncated_parity", stages):
        parity = _truncated_parity(config, source, folder / f".{role}-truncated", spec, opset, attention,
                                   topk_head, say, role, path if dtype == "float32" and quant == "none" else None)
    if not parity["passed"]:
        cut = parity["truncated"]
        raise MtadError(f"{failure_line(parity, role)}; truncated model: {cut['layers']} of {cut['of_layers']} "
                        f"layers, vocab {cut['vocab']}")

    ids = _check_prompts(tokenizer, spec)
    too_big = _cpu_cannot_run(written["parameters"], dtype, quant)
    if too_big:
        say(f"{role}: {too_big}: the {dtype} check runs on the truncated model instead")
        with stage("low_precision_check", stages):
            check = _truncated_low_precision_check(config, source, folder / f".{role}-truncated", spec, opset,
                                                   attention, ids)
        check["full_model_skipped"] = too_big
        return _finish(src, spec, path, role, parity, check, written, stages, quant, block_size, lm_head,
                       say, t_all)
    fake = _fake_quantizer(written["quantized"])
    with stage("reference", stages):
        ref_model = meta_model(config, "float32")
        refs, fakes = [], []
        for name, p in ids.items():
            eta = Eta(say, f"{role}: reference ({name} prompt, {len(p)} tokens{', float and ' + quant if fake else ''}),"
                           " layers")
            r, f = reference.streamed_logits(ref_model, source, p, list(range(len(p))), fake=fake,
                                             progress=lambda i, n, eta=eta: eta(f"layer {i}", i, n))
            refs.append(r)
            fakes.append(f)
        del ref_model
    with stage("engine_check", stages):
        got = _run_engine(path, spec, ids)
        # A quantized graph computes with int8 activations (accuracy_level 4), which the reference does
        # not model; the same graph and bytes with float activations must match it to float precision.
        exact = _run_engine(_float_activations(path), spec, ids) if quant != "none" else None
    check = _compare(dict(zip(ids, refs, strict=True)), dict(zip(ids, got, strict=True)), ids, dtype, quant,
                     dict(zip(ids, fakes, strict=True)), exact)
    return _finish(src, spec, path, role, parity, check, written, stages, quant, block_size, lm_head,
                   say, t_all)


def _finish(src, spec, path, role, parity, check, written, stages, quant, block_size, lm_head, say,
            t_all) -> RoleEntry:
    parity["full_model"] = check
    if not check["passed"]:
        raise MtadError(f"parity: {role} engine differs from transformers' layer-by-layer reference: "
                        f"{check['measure']} {check['value']:.3g} > {check['tolerance']:g} ({check['where']})")
    quantization = {"scheme": "none"}
    if quant != "none":
        quantization = _quant_record(quant, block_size, lm_head, check, written, path)
        msg = f"{role}: perplexity {check['ppl_reference']:.3f} (float reference) -> {check['ppl_engine']:.3f} ({quant})"
        if quantization["quality"]["warn"]:
            msg += f"  WARNING: quantization costs {100 * (check['ppl_ratio'] - 1):.0f}% perplexity"
        say(msg)
    say(f"{role}: done in {time.perf_counter() - t_all:.1f}s (truncated parity {parity['worst']:.1e}, "
        f"full model {check['measure']} {check['value']:.1e}); peak RSS "
        f"{max(s['peak_rss_mb'] for s in stages.values())} MB")
    source_record = src.describe()
    if src.kind == "gguf":
        source_record["sha256"] = sha256_file(src.path)
    return RoleEntry(spec=spec, onnx=f"{role}/model.onnx", onnx_sha256=sha256_file(path), source=source_record,
                     parity=parity, quantization=quantization,
                     export={"data_sha256": written["data_sha256"], "data_bytes": written["data_bytes"],
                             "parameters": written["parameters"], "stages": stages})


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _cpu_cannot_run(parameters: int, dtype: str, quant: str) -> str | None:
    """Why ONNX Runtime on this CPU cannot run the full graph for the engine check (None: it can).

    Its CPU provider has no float16/bfloat16 kernels for most operators and casts the weights to
    float32 at load: a 7B fp16 graph would need ~30 GB. Such graphs are for TensorRT."""
    if dtype == "float32" or quant != "none":
        return None
    need, have = 4 * parameters, _available_memory()
    if need <= 0.6 * have:
        return None
    return (f"ONNX Runtime's CPU provider would hold this {dtype} graph in float32 ({need / 2**30:.1f} GB; "
            f"{have / 2**30:.1f} GB available)")


def _truncated_low_precision_check(config, source, folder: Path, spec: ModelSpec, opset, attention, ids) -> dict:
    """The truncated model exported in the graph's own dtype through the same path, against transformers'
    float32 run of the same truncated weights (what the fp16/bf16 conversion could break)."""
    layers, vocab = reference.truncation(config, getattr(config, "hidden_size", 0) or 0)
    cfg = reference.truncated_config(config, layers, vocab)
    view = reference.TruncatedSource(source, layers, vocab, config.vocab_size)
    prompt = {name: [i for i in p if i < vocab] for name, p in ids.items()}
    try:
        model = meta_model(cfg, spec.dtype)
        tspec = spec_from_model(model, spec.dtype, spec.max_seq_len)
        tspec.topk_head = min(spec.topk_head, tspec.vocab_size)
        build_graph(model, tspec, view, folder / "model.onnx", opset, attention, "none", 0)
        del model
        ref = [reference.streamed_logits(meta_model(cfg, "float32"), view, p, list(range(len(p))))[0]
               for p in prompt.values()]
        got = _run_engine(folder / "model.onnx", tspec, prompt)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    check = _compare(dict(zip(prompt, ref, strict=True)), dict(zip(prompt, got, strict=True)), prompt, spec.dtype,
                     "none", {}, None)
    check["truncated"] = {"layers": layers, "vocab": vocab}
    return check

def _truncated_parity(config, source, folder: Path, spec: ModelSpec, opset, attention, topk_head, say, role,
                      final: Path | None = None) -> dict:
    """Strict parity of the truncated model. `final`: the finished graph when it is float32 and
    unquantized — if the cut keeps every layer and the whole vocabulary, that graph *is* the
    truncated model's, and is checked instead of exporting the same thing twice."""
    from mtad_trt.backends.ort import OrtRunner

    layers, vocab = reference.truncation(config, getattr(config, "hidden_size", 0) or 0)
    cfg = reference.truncated_config(config, layers, vocab)
    view = reference.TruncatedSource(source, layers, vocab, config.vocab_size)
    whole = final is not None and layers == config.num_hidden_layers and vocab == config.vocab_size
    say(f"{role}: truncated parity ({layers} of {config.num_hidden_layers} layers, vocab {vocab}) against transformers")
    try:
        if whole:
            tspec, graph = spec, final
        else:
            model = meta_model(cfg, "float32")
            tspec = spec_from_model(model, "float32", spec.max_seq_len)
            tspec.topk_head = min(topk_head, tspec.vocab_size)
            graph = folder / "model.onnx"
            build_graph(model, tspec, view, graph, opset, attention, "none", 0, label=role)
            del model
        ref = reference.load_all(meta_model(cfg, "float32"), view)
        cases = reference_cases(ref, tspec)
        del ref
        gc.collect()
        engine = OrtRunner(graph, tspec, threads=2)
        parity = check_parity(cases, engine)
        engine.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    parity["truncated"] = {"layers": layers, "of_layers": config.num_hidden_layers, "vocab": vocab,
                           "of_vocab": config.vocab_size, "checked_the_final_graph": whole}
    return parity


def _check_prompts(tokenizer, spec: ModelSpec) -> dict[str, list[int]]:
    """The engine check's prompt: the prose sample (what perplexity is measured on) when there is a
    tokenizer, else random ids. One prompt only: each costs a full pass over the checkpoint."""
    limit = min(spec.max_seq_len, REFERENCE_TOKENS)
    if tokenizer is not None:
        prose = [i for i in tokenizer.encode(PROSE, add_special_tokens=False) if i < spec.vocab_size][:limit]
        if len(prose) >= 8:
            return {"prose": prose}
    rng = np.random.default_rng(1)
    return {"random": [int(x) for x in rng.integers(0, spec.vocab_size, min(64, limit))]}


def _run_engine(path: Path, spec: ModelSpec, ids: dict[str, list[int]]) -> list[np.ndarray]:
    """Logits of every position of each prompt, from the graph at `path` run by the runtime's Row."""
    from mtad_trt.backends.ort import OrtRunner
    from mtad_trt.backends.rows import Row

    engine = OrtRunner(path, spec, threads=2)
    try:
        row = Row(engine)
        out = []
        for p in ids.values():
            row.reset()
            out.append(row.forward(p, logits_rows=range(len(p))).copy())
        return out
    finally:
        engine.close()
        if path.name.startswith("."):
            path.unlink(missing_ok=True)


def _float_activations(path: Path) -> Path:
    """A hidden copy of the graph (not of its data) whose MatMulNBits use float activations
    (accuracy_level 0): the same codes, so it must equal the fake-quantized reference closely."""
    proto = onnx.load(str(path), load_external_data=False)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            keep = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(keep)
    out = path.with_name(f".{path.stem}.float-activations.onnx")
    onnx.save(proto, str(out))  # beside model.onnx: its external data location resolves the same
    return out


def _fake_quantizer(quantized: dict):
    """fake(name, w): the float weights a quantized graph multiplies by (None: stored as it is)."""
    if not quantized:
        return None
    from mtad_trt.export.quantize import fake_quantize

    def fake(name: str, w: np.ndarray):
        q = quantized.get(name)
        if q is None or w.ndim != 2:
            return None
        return fake_quantize(w, q["bits"], q["block_size"])

    return fake


def _compare(refs: dict, got: dict, ids: dict, dtype: str, quant: str, fakes: dict, exact: list | None) -> dict:
    """The engine against the reference.

    float32 graphs: max |Δlogits| to the float reference. float16 / bfloat16: relative error to it.
    Quantized graphs: the same graph with float activations against the fake-quantized reference
    (the same codes in float arithmetic) — what a wrong weight, code or layout would break; the
    real graph's distance to it (its int8 activations) and its perplexity are recorded beside.
    """
    strict = dtype == "float32" and quant == "none"
    names = list(refs)
    if quant != "none":
        test = dict(zip(names, exact, strict=True))
        want = fakes
        measure = "relative error of the float-activation graph to the fake-quantized reference"
        limit = RELATIVE_TOLERANCE["quantized"]
    else:
        test, want = got, refs
        measure = "max |Δlogits|" if strict else "relative error to the reference"
        limit = FLOAT_TOLERANCE if strict else RELATIVE_TOLERANCE[dtype]
    worst, where = -1.0, ""
    for name in names:
        if strict:
            d = float(np.abs(np.asarray(test[name], np.float64) - want[name]).max())
            d = d if np.isfinite(d) else float("inf")
        else:
            d = reference.relative_error(test[name], want[name])
        if d > worst:
            worst, where = d, f"{name} prompt, {len(ids[name])} tokens"
    out = {"measure": measure, "value": worst, "tolerance": limit, "where": where, "passed": bool(worst <= limit),
           "tokens": {k: len(v) for k, v in ids.items()}}
    if quant != "none":
        out["int8_activations_relative_error"] = max(reference.relative_error(got[n], fakes[n]) for n in names)
        out["to_float_reference_relative_error"] = max(reference.relative_error(got[n], refs[n]) for n in names)
    if "prose" in ids:
        p = ids["prose"]
        pr, pe = _perplexity(refs["prose"], p), _perplexity(got["prose"], p)
        out.update(ppl_reference=pr, ppl_engine=pe, ppl_ratio=pe / pr,
                   top1_agreement=float(np.mean(np.argmax(refs["prose"], -1) == np.argmax(got["prose"], -1))))
    return out


def _quant_record(scheme, block_size, lm_head, check, written, path) -> dict:
    from mtad_trt.export.quantize import SCHEMES

    graph = onnx.load(str(path), load_external_data=False)
    n = sum(1 for node in graph.graph.node if node.op_type == "MatMulNBits")
    gathers = [node for node in graph.graph.node if node.op_type == "GatherBlockQuantized"]
    table = {a.name: a.i for a in gathers[0].attribute} if gathers else None
    quality = {"ppl_float": check.get("ppl_reference"), "ppl_quantized": check.get("ppl_engine"),
               "ppl_ratio": check.get("ppl_ratio"), "top1_agreement": check.get("top1_agreement"),
               "text_tokens": check["tokens"].get("prose")}
    quality["warn"] = bool(check.get("ppl_ratio", 1.0) > PPL_WARN_RATIO)
    quality["relative_error"] = check["to_float_reference_relative_error"]
    return {"scheme": scheme, "op": "MatMulNBits", "bits": SCHEMES[scheme], "block_size": block_size,
            "symmetric": True, "accuracy_level": 4, "lm_head": scheme if lm_head == "same" else lm_head,
            "quantized_matmuls": n, "embedding": f"int{table['bits']}" if table else "float",
            "quality": quality}
