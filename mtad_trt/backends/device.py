"""What the torch-based backends (torch, TensorRT) share: devices, dtypes, the runner's own stream,
the host logits buffer.

Each device runner owns one CUDA stream and does all of its device work there — input copy-in,
the model call or TensorRT enqueue / graph replay, the logits copy-out and the cache writes
(`reserve` / `keep` / `move`) — so nothing runs on the legacy default stream (TensorRT adds
device-wide synchronisation there) and a step's kernels are ordered without extra events.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mtad_trt.backends.runner import ShapeCache, SlotCacheRunner
from mtad_trt.contract import DTYPES
from mtad_trt.errors import BackendUnavailable, MtadError

log = logging.getLogger("mtad_trt")

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
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


class HostStream:
    """Stands in for a CUDA stream on CPU, where work is synchronous. Its handle is non-zero, as a
    real side stream's is, so a CPU harness can tell "the runner's stream" from stream 0."""

    def __init__(self) -> None:
        self.cuda_stream = id(self)

    def synchronize(self) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass


Stream = torch.cuda.Stream | HostStream


def runner_stream(device: torch.device) -> Stream:
    """A new stream of the runner's own (a non-default CUDA stream), or a HostStream on CPU."""
    return torch.cuda.Stream(device=device) if device.type == "cuda" else HostStream()


@contextlib.contextmanager
def on_stream(stream: Stream) -> Iterator[None]:
    """Make `stream` torch's current stream for the block (no-op for a HostStream)."""
    if isinstance(stream, torch.cuda.Stream):
        with torch.cuda.stream(stream):
            yield
    else:
        yield


def _on_own_stream(name: str):
    """SlotCacheRunner.`name`, run with the runner's stream current (arguments pass through)."""

    def method(self: StreamRunner, *args: Any, **kwargs: Any) -> Any:
        with on_stream(self.stream):
            return getattr(SlotCacheRunner, name)(self, *args, **kwargs)

    method.__name__ = method.__qualname__ = name
    return method


class StreamRunner(SlotCacheRunner):
    """SlotCacheRunner whose cache work (growing, shrinking, keeping, moving, prefix-cache copies)
    runs on the runner's stream (`self.stream`), whatever the cache's signatures are."""

    stream: Stream

    reserve = _on_own_stream("reserve")
    shrink = _on_own_stream("shrink")
    keep = _on_own_stream("keep")
    move = _on_own_stream("move")
    read = _on_own_stream("read")
    write = _on_own_stream("write")


class HostLogits:
    """Reused host buffers per shape and dtype for what a step returns to the host (pinned on CUDA):
    the float32 logits, and the small top-k head outputs.

    The copy is queued on `stream` (the runner's) and that stream is synchronised: the decoders
    sample on the host right after.
    """

    def __init__(self, device: torch.device, vocab: int, stream: Stream | None = None) -> None:
        self.device, self.vocab = device, vocab
        self.stream = stream if stream is not None else runner_stream(device)
        pinned = device.type == "cuda"

        def make(key: tuple) -> tuple[torch.Tensor, np.ndarray]:
            shape, dtype = key
            host = torch.empty(shape, dtype=dtype, pin_memory=pinned)
            return host, host.numpy()

        self._bufs: ShapeCache[tuple, tuple[torch.Tensor, np.ndarray]] = ShapeCache(make)

    def fetch(self, *tensors: torch.Tensor) -> np.ndarray | tuple[np.ndarray, ...]:
        pairs = [self._bufs.get((tuple(t.shape), t.dtype)) for t in tensors]
        if self.device.type == "cuda":
            with on_stream(self.stream):
                for (host, _), t in zip(pairs, tensors, strict=True):
                    host.copy_(t, non_blocking=True)
            self.stream.synchronize()  # the decoders sample on the host now
        else:
            for (host, _), t in zip(pairs, tensors, strict=True):
                host.copy_(t)
        arrays = tuple(arr for _, arr in pairs)
        return arrays[0] if len(arrays) == 1 else arrays
