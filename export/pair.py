"""`mtad-trt export`: a draft and a target model -> one self-describing engine folder.

Atomic: everything is written into a hidden temporary folder beside the destination and renamed
into place only after both graphs passed `onnx.checker` and their parity checks; an error or
Ctrl-C anywhere removes it. No model is ever loaded whole: each role streams its weights
(`role.py`), so memory is set by the largest tensor, not by the model.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import mtad_trt
from mtad_trt.errors import MtadError
from mtad_trt.export import sources
from mtad_trt.export.role import export_role
from mtad_trt.export.tensors import open_source
from mtad_trt.folder.manifest import Manifest

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
    lm_head: dict[str, str] | str = "same",
    embedding: str = "float",
    attention: str = "grouped",
    topk_head: int = DEFAULT_TOPK_HEAD,
) -> Manifest:
    """Export `draft` (optional) and `target` into the engine folder `out`.

    quantize: scheme per role ("none" | "int8" | "int4"), e.g. {"draft": "int4", "target": "int4"}.
    embedding: the embedding table of quantized graphs, "float" or "quantized" (the role's scheme).
    """
    say = progress or (lambda msg: None)
    out = Path(out)
    if opset < 18:
        raise MtadError(f"opset {opset} is too old: the contract needs opset >= 18")
    quantize = quantize or {}
    from mtad_trt.export.quantize import EMBEDDING, LM_HEAD, SCHEMES

    if embedding not in EMBEDDING:
        raise MtadError(f"bad embedding setting {embedding!r} (choices: {', '.join(EMBEDDING)})")

    heads = {"draft": lm_head, "target": lm_head} if isinstance(lm_head, str) else dict(lm_head)
    for role, head in heads.items():
        if role not in ("draft", "target") or head not in LM_HEAD:
            raise MtadError(f"bad LM head setting {role}={head} (roles: draft, target; choices: {', '.join(LM_HEAD)})")
    for role, scheme in quantize.items():
        if role not in ("draft", "target") or scheme not in SCHEMES:
            raise MtadError(f"bad quantization setting {role}={scheme} (roles: draft, target; schemes: {', '.join(SCHEMES)})")
        if scheme != "none" and dtype != "float32":
            raise MtadError("weight-only quantization starts from a float32 export (use --dtype fp32)")
    _check_destination(out, force)
    srcs = {"target": sources.resolve(target)}
    if draft is not None:
        srcs["draft"] = sources.resolve(draft)
    configs = {role: sources.load_config(src) for role, src in srcs.items()}
    toks = {role: sources.load_hf_tokenizer(src) for role, src in srcs.items()}
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
            if role not in srcs:
                continue
            source = open_source(srcs[role].kind, srcs[role].path)
            try:
                roles[role] = export_role(
                    srcs[role], configs[role], source, tmp, role, dtype, max_seq_len, opset, say,
                    quant=quantize.get(role, "none"), tokenizer=toks[role],
                    block_size=block_size, lm_head=heads.get(role, "same"), attention=attention, embedding=embedding,
                    topk_head=topk_head,
                )
            finally:
                source.close()
        eos = tok.eos_token_id
        manifest = Manifest(
            roles=roles,
            mtad_trt_version=mtad_trt.__version__,
            eos_token_ids=[int(eos)] if eos is not None else [],
            pad_token_id=tok.pad_token_id,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            export_settings={"dtype": dtype, "opset": opset, "max_seq_len": max_seq_len, "quantize": quantize,
                             "block_size": block_size, "lm_head": heads, "embedding": embedding, "attention": attention,
                             "topk_head": topk_head},
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
