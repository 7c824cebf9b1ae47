"""GGUF -> a complete Hugging Face folder (fp32 safetensors), streamed and checked tensor by tensor.

transformers dequantizes a GGUF on *every* load (13-47 s) and the export stage reloads often, so a
named model is converted once. The folder is what `save_pretrained` would write (config with
`architectures`, generation config, tokenizer), so other tools that dispatch on it — ONNX Runtime
GenAI's model builder among them — accept it too.

The conversion never holds the model: `GGUFSource` dequantizes one tensor at a time (with
transformers' own name map and per-tensor fixes) and `write_safetensors` writes it and drops it, so
memory is set by the largest tensor, not by the model. The check re-reads the written file and the
GGUF tensor by tensor and requires them bit-identical: the folder then holds exactly the weights
transformers' GGUF load produces, under the config it builds, so the two give identical logits
(`tests/test_convert.py` checks that on SmolLM2) without either model being loaded here.
"""

from __future__ import annotations

import copy
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

CHECK_BLOCK_BYTES = 64 << 20
"""The folder is compared with the GGUF in row blocks of at most this much float32 per side."""

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


def _ticker(progress: Progress | None, what: str, sizes: list[int], every_s: float = 10.0) -> Callable[[int], None]:
    """`tick(i)` after the i-th of tensors of these sizes: a progress line at most every `every_s`
    seconds, with the time left at the rate so far (in elements: the embedding alone can be 10%)."""
    t0 = last = time.perf_counter()
    total, done = sum(sizes) or 1, [0]

    def tick(i: int) -> None:
        nonlocal last
        done[0] += sizes[i - 1]
        now = time.perf_counter()
        if now - last >= every_s and i < len(sizes):
            last = now
            spent, left = now - t0, (total - done[0]) / max(done[0], 1)
            say(progress, f"{what} {i}/{len(sizes)} tensors in {spent:.0f} s, about {spent * left:.0f} s left")

    return tick


def convert_gguf(source: dict[str, Any], gguf: Path, dest: Path, progress: Progress | None) -> dict:
    """Dequantize the GGUF into a safetensors folder at dest, one tensor at a time, checked tensor by tensor.

    transformers 5.x's save_pretrained refuses GGUF-loaded models, and loading one would hold the
    whole float model, so the weights, config, generation config and tokenizer are written
    piecewise. With tied embeddings no `lm_head.weight` is written (the GGUF has none either), as
    Hugging Face checkpoints do: from_pretrained re-ties it from `config.tie_word_embeddings`.
    `source` (name, gguf_sha256, ...) goes into the marker that says the folder is complete.
    """
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from mtad_trt.export.gguf_source import GGUFSource
    from mtad_trt.export.tensors import SafetensorsSource, row_blocks, write_safetensors

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    timings: dict[str, float] = {}
    name = source["name"]
    src = None
    try:
        t0 = time.perf_counter()
        say(progress, f"opening {gguf.name} (tensors are dequantized one at a time)")
        src = GGUFSource(gguf)
        if src.missing:
            raise MtadError(f"{name}: {gguf} has no tensor for {len(src.missing)} parameter(s) of "
                            f"{src.architecture}, e.g. {src.missing[0]}; conversion refused")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        ids = tok(_PROBE_TEXT).input_ids
        tied = bool(getattr(src.config, "tie_word_embeddings", False))
        names = [n for n in src.names() if not (tied and n == "lm_head.weight")]
        timings["open_gguf_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        path = tmp / "model.safetensors"
        say(progress, f"writing {path}")
        sizes = [src.info(n).numel for n in names]
        tick, index = _ticker(progress, "written", sizes), {n: i for i, n in enumerate(names, 1)}

        def produce(n: str):
            x = src.read(n)
            tick(index[n])
            return x

        write_safetensors(path, [(n, src.info(n).shape, "F32") for n in names], produce)
        config = copy.deepcopy(src.config)
        # The folder holds plain fp32 weights; a GGUF quantization_config would make
        # from_pretrained look for the .gguf file again.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [src.architecture]  # what save_pretrained writes; GGUF configs lack it
        config.dtype = torch.float32  # the weights' dtype, as save_pretrained of the fp32 model wrote
        config.save_pretrained(str(tmp))
        GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        n_params = sum(sizes)
        timings["write_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        say(progress, "re-reading the folder to check it tensor by tensor against the GGUF")
        back = SafetensorsSource(tmp)
        try:
            if sorted(back.names()) != sorted(names):
                raise MtadError(f"{name}: the converted folder holds {len(back.names())} tensors, "
                                f"the GGUF {len(names)}; conversion refused")
            tick = _ticker(progress, "checked", sizes)
            for i, n in enumerate(names, 1):
                info = src.info(n)
                if back.info(n).shape != info.shape:
                    raise MtadError(f"{name}: tensor {n} has shape {list(back.info(n).shape)} in the converted "
                                    f"folder, {list(info.shape)} in the GGUF; conversion refused")
                for rows in row_blocks(info, CHECK_BLOCK_BYTES):
                    a, b = back.read(n, rows), src.read(n, rows)
                    if not np.array_equal(a, b):  # also catches NaN
                        raise MtadError(f"{name}: tensor {n} of the converted folder differs from the GGUF's "
                                        f"(max abs diff {np.abs(a - b).max():g}); conversion refused")
                    del a, b
                tick(i)
        finally:
            back.close()
        back_config = AutoConfig.from_pretrained(str(tmp))
        if back_config.architectures != [src.architecture]:
            raise MtadError(f"{name}: the converted folder's config names {back_config.architectures}, "
                            f"not {src.architecture}")
        tok_back = AutoTokenizer.from_pretrained(str(tmp))
        if tok_back(_PROBE_TEXT).input_ids != ids:
            raise MtadError(f"{name}: the saved tokenizer encodes differently from the GGUF's")
        if (tok_back.chat_template or None) != (tok.chat_template or None):
            raise MtadError(f"{name}: the saved tokenizer lost the GGUF's chat template")
        timings["verify_s"] = time.perf_counter() - t0

        marker = {
            **source,
            "parameters": n_params,
            "tied_embeddings": tied,
            "check": "every tensor bit-identical to transformers' GGUF load",
            "max_abs_weight_diff": 0.0,
            # Not computed (no model is loaded): identical weights and config give identical logits,
            # as the reload-and-compare check of earlier versions measured (0.0). registry.fetch prints it.
            "max_abs_logit_diff": 0.0,
            "timings": {k: round(v, 1) for k, v in timings.items()},
            "transformers": importlib.metadata.version("transformers"),
            "gguf": importlib.metadata.version("gguf"),
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
        if src is not None:
            src.close()
        shutil.rmtree(tmp, ignore_errors=True)
