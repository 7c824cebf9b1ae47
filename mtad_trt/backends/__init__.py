"""Backend selection: one `ModelRunner` per role from an engine folder.

`auto` prefers, in order: a TensorRT plan that matches this machine, torch on CUDA, ONNX Runtime
on CPU — and says which it picked. A backend that cannot run here is refused with one line
saying what is missing, never a traceback.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from mtad_trt.errors import BackendUnavailable
from mtad_trt.manifest import Manifest
from mtad_trt.runner import ModelRunner

log = logging.getLogger("mtad_trt")

BACKENDS = ("auto", "ort", "torch", "trt")
DEVICES = ("auto", "cpu", "cuda")


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def choose_backend(manifest: Manifest, backend: str = "auto", device: str = "auto") -> tuple[str, str]:
    """Resolve (backend, device) for this machine, or raise BackendUnavailable."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if device not in DEVICES:
        raise BackendUnavailable(f"unknown device '{device}' (choose from {', '.join(DEVICES)})")
    has_cuda = cuda_available()
    if device == "cuda" and not has_cuda:
        raise BackendUnavailable("--device cuda: no CUDA GPU is visible to torch (use --device cpu)")
    if backend == "auto":
        if device != "cpu" and has_cuda:
            from mtad_trt.backends.trt_plans import usable_plans

            if usable_plans(manifest) is not None:
                return "trt", "cuda"
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
) -> ModelRunner:
    entry = manifest.role(role)
    folder = Path(folder)
    if backend == "ort":
        from mtad_trt.backends.ort import OrtRunner

        if entry.quantization.get("scheme", "none") != "none" and device == "cuda":
            raise BackendUnavailable("quantized graphs use ONNX Runtime CPU operators; run them with --device cpu")
        return OrtRunner(folder / entry.onnx, entry.spec, threads=threads)
    if backend == "torch":
        from mtad_trt.backends.torch_backend import TorchRunner

        return TorchRunner.from_folder(folder, manifest, role, device=device, threads=threads)
    if backend == "trt":
        from mtad_trt.backends.trt import TrtRunner

        return TrtRunner.from_folder(folder, manifest, role)
    raise BackendUnavailable(f"unknown backend '{backend}'")
