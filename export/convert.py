"""GGUF -> a complete Hugging Face folder (fp32 safetensors), checked by reloading it.

transformers dequantizes a GGUF on *every* load (13-47 s) and the export stage reloads often, so a
named model is converted once. The folder is what `save_pretrained` would write (config with
`architectures`, generation config, tokenizer), so other tools that dispatch on it — ONNX Runtime
GenAI's model builder among them — accept it too.
"""

from __future__ import annotations

import copy
import gc
import importlib.metadata
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtad_trt.errors import MtadError

Progress = Callable[[str], None]

MARKER = "mtad_trt_source.json"
"""Written last into a converted folder; its presence (with the right sha256) means "complete"."""

LOGITS_TOLERANCE = 1e-4
"""Max abs logit difference allowed between the GGUF-loaded model and the converted folder."""

_PROBE_TEXT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:'


def is_complete(folder: Path, gguf_sha256: str) -> bool:
    """A folder counts only if the marker (written last) names this source checksum."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("gguf_sha256") == gguf_sha256
        and (folder / "config.json").is_file()
        and (folder / "model.safetensors").is_file()
    )


def complete_config(folder: Path) -> None:
    """Give a folder converted by an older mtad-trt what save_pretrained would have written:
    `architectures` in config.json and a generation_config.json (cheap; no weights are read)."""
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(cfg.get("model_type", ""))
    if arch is None:  # not a causal-LM config transformers knows: nothing to complete
        return
    if not cfg.get("architectures"):
        cfg["architectures"] = [arch]
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if not (folder / "generation_config.json").is_file():
        GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(folder))).save_pretrained(str(folder))


def say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def tmp_name(path: Path) -> Path:
    """A hidden sibling unique to this process, so concurrent fetches never write the same file."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def tensors_for_saving(model) -> dict:
    """The state dict in a form safetensors accepts.

    safetensors refuses tensors that share memory. With tied embeddings (``lm_head.weight`` is
    ``model.embed_tokens.weight``) the duplicate is dropped, as Hugging Face checkpoints do:
    from_pretrained re-ties it from ``config.tie_word_embeddings``. Any other sharing is cloned.
    """
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    out = {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        ptr = ident[0]
        if ident in seen and tied:
            continue
        if ptr in storages:
            t = t.clone()
        storages.add(ptr)
        seen.setdefault(ident, key)
        out[key] = t.contiguous()
    return out


def convert_gguf(source: dict[str, Any], gguf: Path, dest: Path, progress: Progress | None) -> dict:
    """Dequantize the GGUF into a safetensors folder at dest, checked by reloading it.

    transformers 5.x's save_pretrained refuses GGUF-loaded models, so the weights, config,
    generation config and tokenizer are written piecewise. Peak memory is about one fp32 model:
    the GGUF-loaded model is freed before the folder is reloaded for the logits check.
    `source` (name, gguf_sha256, ...) goes into the marker that says the folder is complete.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    timings: dict[str, float] = {}
    name = source["name"]
    try:
        t0 = time.perf_counter()
        say(progress, f"loading and dequantizing {gguf.name}")
        src = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        ids = tok(_PROBE_TEXT, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = src(ids).logits
        timings["load_gguf_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        say(progress, f"writing {tmp / 'model.safetensors'}")
        tensors = tensors_for_saving(src)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _umask = os.umask(0)
        os.umask(_umask)
        (tmp / "model.safetensors").chmod(0o666 & ~_umask)  # safetensors creates it 0600
        config = copy.deepcopy(src.config)
        # The folder holds plain fp32 weights; a kept GGUF quantization_config would make
        # from_pretrained look for the .gguf file again.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(src).__name__]  # what save_pretrained writes; GGUF configs lack it
        config.save_pretrained(str(tmp))
        generation = getattr(src, "generation_config", None) or GenerationConfig.from_model_config(config)
        generation.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        n_params = sum(t.numel() for t in tensors.values())
        tied = len(tensors) < len(src.state_dict())
        del src, tensors
        gc.collect()
        timings["write_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        say(progress, "reloading the folder to check logits")
        back, info = AutoModelForCausalLM.from_pretrained(
            str(tmp), dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
        bad = {
            k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
        }
        if bad:
            raise MtadError(f"{name}: the converted folder does not load cleanly: {bad}")
        tok_back = AutoTokenizer.from_pretrained(str(tmp))
        if tok_back(_PROBE_TEXT, return_tensors="pt").input_ids.tolist() != ids.tolist():
            raise MtadError(f"{name}: the saved tokenizer encodes differently from the GGUF's")
        if (tok_back.chat_template or None) != (tok.chat_template or None):
            raise MtadError(f"{name}: the saved tokenizer lost the GGUF's chat template")
        with torch.no_grad():
            diff = (back.eval()(ids).logits - ref).abs().max().item()
        del back
        gc.collect()
        timings["verify_s"] = time.perf_counter() - t0
        if not diff <= LOGITS_TOLERANCE:  # also catches NaN
            raise MtadError(
                f"{name}: converted folder's logits differ from the GGUF's by {diff:g} "
                f"(> {LOGITS_TOLERANCE:g}); conversion refused"
            )

        marker = {
            **source,
            "parameters": n_params,
            "tied_embeddings": tied,
            "max_abs_logit_diff": diff,
            "timings": {k: round(v, 1) for k, v in timings.items()},
            "transformers": importlib.metadata.version("transformers"),
            "torch": torch.__version__,
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # last: it means "complete"
        if dest.exists():  # an incomplete leftover (a complete one returned early in fetch)
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not is_complete(dest, source["gguf_sha256"]):  # not a concurrent fetch that finished first
                raise
        return marker
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
