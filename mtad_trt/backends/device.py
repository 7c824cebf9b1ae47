"""What the torch-based backends (torch, TensorRT) share: devices, dtypes, the host logits buffer."""

from __future__ import annotations

import logging

import numpy as np
import torch

from mtad_trt.errors import BackendUnavailable, MtadError
from mtad_trt.runner import ShapeCache

log = logging.getLogger("mtad_trt")

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def torch_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("torch backend on CUDA: no CUDA GPU is visible to torch (use --device cpu)")
    return dev


def runtime_dtype(spec_dtype: str, device: torch.device, override: str | None = None) -> str:
    """fp32 on CPU (bf16/fp16 matmuls are far slower there); the graph's dtype on CUDA."""
    want = override or spec_dtype
    if want not in TORCH_DTYPES:
        raise MtadError(f"unknown dtype '{want}' (choose from {', '.join(TORCH_DTYPES)})")
    if device.type == "cpu":
        if want != "float32":
            log.info("torch backend on CPU runs in float32 (the engine's dtype is %s)", want)
        return "float32"
    if want == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise BackendUnavailable("this GPU has no bfloat16 support: run with dtype float16 or float32")
    return want


class HostLogits:
    """Reused host buffers per (B, K) for the float32 logits a step returns (pinned on CUDA)."""

    def __init__(self, device: torch.device, vocab: int) -> None:
        self.device, self.vocab = device, vocab
        pinned = device.type == "cuda"

        def make(key: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray]:
            host = torch.empty((*key, vocab), dtype=torch.float32, pin_memory=pinned)
            return host, host.numpy()

        self._bufs: ShapeCache[tuple[int, int], tuple[torch.Tensor, np.ndarray]] = ShapeCache(make)

    def fetch(self, logits: torch.Tensor) -> np.ndarray:
        host, arr = self._bufs.get((logits.shape[0], logits.shape[1]))
        if self.device.type == "cuda":
            host.copy_(logits, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()  # the decoders sample on the host now
        else:
            host.copy_(logits)
        return arr
