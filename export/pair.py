"""`mtad-trt export`: a draft and a target model -> one self-describing engine folder.

Atomic: everything is written into a hidden temporary folder beside the destination and renamed
into place only after both graphs passed `onnx.checker` and the parity check. Models are loaded,
exported and freed one at a time so the default pair fits in 24 GB of RAM.
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import onnx

import mtad_trt
from mtad_trt.contract import spec_from_model, unsupported_feature
from mtad_trt.errors import MtadError
from mtad_trt.export import sources
from mtad_trt.export.onnx_export import export_onnx
from mtad_trt.export.parity import check_parity, failure_line, long_layout, reference_cases
from mtad_trt.manifest import Manifest, RoleEntry, sha256_file

Progress = Callable[[str], None]
DEFAULT_TOPK_HEAD = 64  # top-k head width: covers the paper's top-k 10 and beams up to 64 (0 = no head)
log = logging.getLogger("mtad_trt.export")


def _check_destination(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise MtadError(f"{out} already exists (use --force to replace it)")
    parent = out.parent if out.parent != Path("") else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MtadError(f"cannot create {parent}: {e.strerror}") from None
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise MtadError(f"cannot write into {parent}: {e.strerror}") from None


def export_role(
    src: sources.Checkpoint,
    folder: Path,
    role: str,
    dtype: str,
    max_seq_len: int,
    opset: int,
    say: Progress,
    quant: str = "none",
    tokenizer=None,
    block_size: int = 128,
    quantize_lm_head: bool = True,
    attention: str = "grouped",
    topk_head: int = DEFAULT_TOPK_HEAD,
) -> RoleEntry:
    from mtad_trt.backends.ort import OrtRunner

    t0 = time.perf_counter()
    say(f"{role}: loading {src.path}")
    model = sources.load_model(src, dtype)
    spec = spec_from_model(model, dtype, max_seq_len)
    spec.topk_head = min(topk_head, spec.vocab_size)
    why = unsupported_feature(model, spec.max_seq_len)
    if why is not None:
        raise MtadError(f"{role}: cannot export: {why}")
    final_path = folder / role / "model.onnx"
    onnx_path = final_path if quant == "none" else folder / role / "float" / "model.onnx"
    say(f"{role}: exporting {spec.architecture} ({spec.num_layers} layers, vocab {spec.vocab_size}) to ONNX")
    try:
        export_onnx(model, spec, onnx_path, opset=opset, attention=attention)
    except MtadError:
        raise
    except Exception as e:
        raise MtadError(f"{role}: ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    onnx.checker.check_model(str(onnx_path))  # path form: works with external data
    say(f"{role}: parity check against transformers (eager attention), up to {long_layout(spec)['context']} tokens")
    cases = reference_cases(model, spec)
    del model  # free the torch weights before ONNX Runtime maps the graph's
    gc.collect()
    engine = OrtRunner(onnx_path, spec, threads=2)
    parity = check_parity(cases, engine)
    engine.close()
    del engine, cases
    gc.collect()
    if not parity["passed"]:
        raise MtadError(failure_line(parity, role))
    quantization = {"scheme": "none"}
    if quant != "none":
        quantization = _quantize(onnx_path, final_path, spec, quant, tokenizer, block_size, quantize_lm_head, role, say)
    say(f"{role}: done in {time.perf_counter() - t0:.1f}s (max |Δlogits| {parity['worst']:.2e})")
    source = src.describe()
    if src.kind == "gguf":
        source["sha256"] = sha256_file(src.path)
    return RoleEntry(
        spec=spec,
        onnx=f"{role}/model.onnx",
        onnx_sha256=sha256_file(final_path),
        source=source,
        parity=parity,
        quantization=quantization,
    )


def _quantize(float_path, final_path, spec, scheme, tokenizer, block_size, lm_head, role, say) -> dict:
    from mtad_trt.backends.ort import OrtRunner
    from mtad_trt.export.quantize import compare_quality, quantize_graph

    say(f"{role}: quantizing MatMul weights to {scheme} (block {block_size}, LM head {'in' if lm_head else 'out'})")
    record = quantize_graph(float_path, final_path, scheme, spec.vocab_size, block_size, lm_head)
    say(f"{role}: perplexity check, float vs {scheme}")
    f_engine, q_engine = OrtRunner(float_path, spec, threads=2), OrtRunner(final_path, spec, threads=2)
    record["quality"] = compare_quality(f_engine, q_engine, tokenizer)
    f_engine.close()
    q_engine.close()
    shutil.rmtree(float_path.parent)  # the float graph served only as the quality reference
    qual = record["quality"]
    msg = f"{role}: perplexity {qual['ppl_float']:.3f} (float) -> {qual['ppl_quantized']:.3f} ({scheme})"
    if qual["warn"]:
        msg += f"  WARNING: quantization costs {100 * (qual['ppl_ratio'] - 1):.0f}% perplexity"
        log.warning(msg)
    say(msg)
    return record


def export_pair(
    draft: str | None,
    target: str,
    out: str | Path,
    max_seq_len: int = 2048,
    dtype: str = "float32",
    opset: int = 18,
    force: bool = False,
    progress: Progress | None = None,
    quantize: dict[str, str] | None = None,
    block_size: int = 128,
    quantize_lm_head: bool = True,
    attention: str = "grouped",
    topk_head: int = DEFAULT_TOPK_HEAD,
) -> Manifest:
    """Export `draft` (optional) and `target` into the engine folder `out`.

    quantize: scheme per role ("none" | "int8" | "int4"), e.g. {"draft": "int4", "target": "int4"}.
    """
    say = progress or (lambda msg: None)
    out = Path(out)
    if opset < 18:
        raise MtadError(f"opset {opset} is too old: the contract needs opset >= 18")
    quantize = quantize or {}
    from mtad_trt.export.quantize import SCHEMES

    for role, scheme in quantize.items():
        if role not in ("draft", "target") or scheme not in SCHEMES:
            raise MtadError(f"bad quantization setting {role}={scheme} (roles: draft, target; schemes: {', '.join(SCHEMES)})")
        if scheme != "none" and dtype != "float32":
            raise MtadError("weight-only quantization starts from a float32 export (use --dtype fp32)")
    _check_destination(out, force)
    srcs = {"target": sources.resolve(target)}
    if draft is not None:
        srcs["draft"] = sources.resolve(draft)
    toks = {role: sources.load_tokenizer(src) for role, src in srcs.items()}
    if draft is not None:
        why = sources.tokenizer_difference(toks["draft"], toks["target"])
        if why:
            raise MtadError(f"draft and target tokenizers differ: {why}; they must share one tokenizer")

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tok = toks["target"]
        tok.save_pretrained(str(tmp / "tokenizer"))
        roles = {}
        for role in ("draft", "target"):
            if role in srcs:
                roles[role] = export_role(
                    srcs[role], tmp, role, dtype, max_seq_len, opset, say,
                    quant=quantize.get(role, "none"), tokenizer=toks[role],
                    block_size=block_size, quantize_lm_head=quantize_lm_head, attention=attention,
                    topk_head=topk_head,
                )
        eos = tok.eos_token_id
        manifest = Manifest(
            roles=roles,
            mtad_trt_version=mtad_trt.__version__,
            eos_token_ids=[int(eos)] if eos is not None else [],
            pad_token_id=tok.pad_token_id,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            export_settings={"dtype": dtype, "opset": opset, "max_seq_len": max_seq_len, "quantize": quantize,
                             "block_size": block_size, "attention": attention, "topk_head": topk_head},
        )
        manifest.save(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
