"""Backend selection: one `ModelRunner` per role from an engine folder.

`auto` prefers, in order: a TensorRT plan that matches this machine, torch on CUDA, ONNX Runtime
on CPU — and says which it picked. A backend that cannot run here is refused with one line
saying what is missing, never a traceback.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

from mtad_trt.backends.runner import ModelRunner
from mtad_trt.contract import DTYPE_BYTES
from mtad_trt.errors import BackendUnavailable, CapacityError
from mtad_trt.extras import TORCH, importable, require
from mtad_trt.folder.manifest import Manifest

log = logging.getLogger("mtad_trt")

BACKENDS = ("auto", "ort", "torch", "trt")
DEVICES = ("auto", "cpu", "cuda")


def _torch_version() -> str | None:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_driver_loads() -> bool:
    """Whether the NVIDIA driver library loads: without it no torch build sees a CUDA GPU."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def cuda_available() -> bool:
    """torch sees a CUDA GPU. torch is imported (it is big) only when it could say yes: it is
    installed, is not a CPU-only build, and the NVIDIA driver loads (ROCm builds are always asked)."""
    version = _torch_version()
    if version is not None and "+cpu" in version:
        return False
    if not importable("torch"):
        return False
    if (version is None or "rocm" not in version) and not _cuda_driver_loads():
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# What each torch-based backend imports beyond the runtime (the torch backend loads the HF model).
BACKEND_NEEDS = {"torch": TORCH, "trt": ("torch",)}


def choose_backend(manifest: Manifest, backend: str = "auto", device: str = "auto") -> tuple[str, str]:
    """Resolve (backend, device) for this machine, or raise BackendUnavailable.

    Whether CUDA is visible is asked only when the answer matters: `--backend ort` on the CPU
    never imports torch."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if device not in DEVICES:
        raise BackendUnavailable(f"unknown device '{device}' (choose from {', '.join(DEVICES)})")
    if backend in BACKEND_NEEDS:
        require(f"--backend {backend}", "torch", BACKEND_NEEDS[backend], BackendUnavailable)
    if backend == "ort" and device != "cuda":
        return "ort", "cpu"
    if backend == "auto" and device == "cpu":
        return "ort", "cpu"
    has_cuda = cuda_available()
    if device == "cuda" and not has_cuda:
        require("--device cuda", "torch", ("torch",), BackendUnavailable)
        raise BackendUnavailable("--device cuda: no CUDA GPU is visible to torch (use --device cpu)")
    if backend == "auto":
        if device != "cpu" and has_cuda:
            from mtad_trt.backends.trt_plans import usable_plans

            if usable_plans(manifest) is not None:
                return "trt", "cuda"
            require("--backend auto (torch on CUDA here)", "torch", TORCH, BackendUnavailable)
            return "torch", "cuda"
        return "ort", "cpu"
    if backend == "trt":
        if not has_cuda:
            raise BackendUnavailable("--backend trt needs an NVIDIA GPU with CUDA; none is visible here")
        return "trt", "cuda"
    if backend == "ort":
        if device == "cuda":
            raise BackendUnavailable("--backend ort runs on CPU here; use --backend torch --device cuda for the GPU")
        return "ort", "cpu"
    return "torch", ("cuda" if (device == "cuda" or (device == "auto" and has_cuda)) else "cpu")


def load_runner(
    folder: str | Path,
    manifest: Manifest,
    role: str,
    backend: str,
    device: str,
    threads: int = 1,
    batch: int = 1,
) -> ModelRunner:
    """A runner for `role` whose KV cache has `batch` rows (requests that run at once)."""
    entry = manifest.role(role)
    folder = Path(folder)
    if backend == "ort":
        from mtad_trt.backends.ort import OrtRunner

        if entry.quantization.get("scheme", "none") != "none" and device == "cuda":
            raise BackendUnavailable("quantized graphs use ONNX Runtime CPU operators; run them with --device cpu")
        return OrtRunner(folder / entry.onnx, entry.spec, threads=threads, batch=batch)
    if backend == "torch":
        from mtad_trt.backends.torch_backend import TorchRunner

        return TorchRunner.from_folder(folder, manifest, role, device=device, threads=threads, batch=batch)
    if backend == "trt":
        from mtad_trt.backends.trt import TrtRunner

        return TrtRunner.from_folder(folder, manifest, role, batch=batch)
    raise BackendUnavailable(f"unknown backend '{backend}'")


def kv_cache_bytes(spec, rows: int) -> int:
    """Bytes of one model's static KV cache with `rows` batch rows at full capacity."""
    return 2 * spec.num_layers * rows * spec.num_kv_heads * spec.max_seq_len * spec.head_dim * DTYPE_BYTES[spec.dtype]


def available_bytes(device: str) -> int | None:
    """Memory a new allocation can still get: MemAvailable on the host, free memory on the GPU."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


MAX_BATCH_CEILING = 16  # the widest batch measured to pay on CPU (docs/serve.md); more rows only add padding
MEMORY_SHARE = 0.5  # of the memory available at load: what the default batch's KV caches may take


def graph_bytes(manifest: Manifest, roles: list[str], folder: Path | None) -> int:
    """Bytes of the roles' ONNX graphs and weights on disk (what loading them maps or copies)."""
    if folder is None:
        return 0
    total = 0
    for role in roles:
        onnx = (Path(folder) / manifest.role(role).onnx).parent
        total += sum(p.stat().st_size for p in onnx.glob("model.onnx*") if p.is_file())
    return total


def default_max_batch(manifest: Manifest, roles: list[str], device: str, folder: Path | None = None) -> tuple[int, str]:
    """The batch rows to allocate when the user gave none, and the rule in words.

    As many rows as the engine's full-capacity KV caches of every role fit in half of the memory
    available at load after the graphs' weights, at most MAX_BATCH_CEILING, at least 1.
    """
    per_row = sum(kv_cache_bytes(manifest.role(role).spec, 1) for role in roles)
    have = available_bytes(device)
    if have is None:
        return MAX_BATCH_CEILING, f"{MAX_BATCH_CEILING} (available memory unknown)"
    room = MEMORY_SHARE * have - graph_bytes(manifest, roles, folder)
    rows = max(1, min(MAX_BATCH_CEILING, int(room // per_row)))
    return rows, (f"{rows} (full-capacity KV caches of {per_row / 2**20:.0f} MiB a row in half of the "
                  f"{have / 2**30:.1f} GiB available, at most {MAX_BATCH_CEILING})")


def check_memory(manifest: Manifest, roles: list[str], rows: int, device: str, folder: Path | None = None) -> int:
    """Refuse at load, naming the sizes, a KV cache (+ graph weights) that cannot fit in memory.

    Host caches are committed when allocated (`kvcache.committed_zeros`): without this check an
    oversized --max-batch would push the machine into swap or be OOM-killed while loading.
    Returns the KV-cache bytes.
    """
    kv = {role: kv_cache_bytes(manifest.role(role).spec, rows) for role in roles}
    weights = graph_bytes(manifest, roles, folder)
    need = sum(kv.values()) + weights
    have = available_bytes(device)
    if have is not None and need > have:
        parts = " + ".join(f"{role} {b / 2**30:.2f} GiB" for role, b in kv.items())
        raise CapacityError(
            f"a KV cache for {rows} rows needs {sum(kv.values()) / 2**30:.2f} GiB ({parts}) and the graphs "
            f"{weights / 2**30:.2f} GiB, but only {have / 2**30:.2f} GiB of {'GPU' if device == 'cuda' else 'host'} "
            "memory is available: lower --max-batch (or export with a smaller --max-seq-len)"
        )
    return sum(kv.values())
