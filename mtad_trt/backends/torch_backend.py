"""PyTorch backend: the contract wrapper itself, on CPU or CUDA.

It runs the same `ContractWrapper` that export traces, so it is the parity reference for every
other backend, and the GPU path that can be measured where TensorRT is absent. On CUDA its
decode/verify steps replay CUDA graphs (`mtad_trt.cuda_graphs`).

The device KV cache here (`TorchKVCache`) is also the TensorRT backend's: same flat-buffer /
prefix-bucket design as `HostKVCache`, as torch tensors on the device.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mtad_trt.cuda_graphs import Capturer, GraphRunner, Key, StaticInputs, TorchCudaCapturer
from mtad_trt.engine import SlotCacheEngine, StepInputs, bucket_sizes, next_bucket
from mtad_trt.errors import BackendUnavailable, EngineFolderError, MtadError
from mtad_trt.manifest import Manifest, ModelSpec

log = logging.getLogger("mtad_trt")

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
DEFAULT_MAX_DECODE_TOKENS = 32  # widest step (verify chain / draft tree) that is graph-captured


class TorchKVCache:
    """Static-slot KV cache on a torch device, allocated once, zeroed (engine-contract §3).

    One [2L, B*Hkv*S_max*D] tensor; layer i's current bucket is the prefix of row i viewed as
    [B, Hkv, S, D] (contiguous, at a fixed address for every bucket, which CUDA graphs and
    TensorRT tensor addresses rely on). `all_layers` views every layer at once, so `move` is one
    gather + one scatter however many layers there are.
    """

    def __init__(
        self,
        spec: ModelSpec,
        batch: int,
        device: torch.device | str,
        dtype: torch.dtype,
        smallest_bucket: int = 128,
    ) -> None:
        self.spec, self.batch = spec, batch
        self.device = torch.device(device)
        self.buckets = bucket_sizes(spec.max_seq_len, smallest_bucket)
        self._rows = batch * spec.num_kv_heads
        per = self._rows * spec.max_seq_len * spec.head_dim
        self._flat = torch.zeros((2 * spec.num_layers, per), dtype=dtype, device=self.device)
        self.size = self.buckets[0]
        self.views: list[torch.Tensor] = []
        self.all_layers = self._flat
        self._make_views()

    def _make_views(self) -> None:
        s = self.spec
        n = self._rows * self.size * s.head_dim
        self.all_layers = self._flat[:, :n].view(2 * s.num_layers, self.batch, s.num_kv_heads, self.size, s.head_dim)
        self.views = list(self.all_layers.unbind(0))

    def reserve(self, slots: int) -> int:
        new = next_bucket(self.buckets, self.size, slots, self.spec.max_seq_len)
        if new is None:
            return self.size
        old, rows, d = self.size, self._rows, self.spec.head_dim
        for f in self._flat:  # one layer at a time: the temporary copy stays one layer's bucket
            kept = f[: rows * old * d].view(rows, old * d).clone()
            grown = f[: rows * new * d].view(rows, new * d)
            grown[:, old * d :].zero_()
            grown[:, : old * d].copy_(kept)
        self.size = new
        self._make_views()
        return new

    def reset(self) -> None:
        self._flat.zero_()  # zeroed, never NaN: a masked slot still enters 0 x value
        self.size = self.buckets[0]
        self._make_views()

    def _index(self, idx: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(idx, dtype=np.int64)).to(self.device, non_blocking=True)

    @torch.no_grad()
    def keep(self, new_kv: list[torch.Tensor], row: int, src: np.ndarray, dst: np.ndarray) -> None:
        if len(src) == 0:
            return
        s, d = self._index(src), self._index(dst)
        for cache, new in zip(self.views, new_kv, strict=True):
            cache[row].index_copy_(1, d, new[row].index_select(1, s))

    @torch.no_grad()
    def move(self, row: int, src: np.ndarray, dst: np.ndarray) -> None:
        if len(src) == 0:
            return
        layers = self.all_layers[:, row]  # [2L, Hkv, S, D]
        layers.index_copy_(2, self._index(dst), layers.index_select(2, self._index(src)))  # gather first: overlap-safe


class HostLogits:
    """Reused host buffers per (B, K) for the float32 logits a step returns (pinned on CUDA)."""

    def __init__(self, device: torch.device, vocab: int) -> None:
        self.device, self.vocab = device, vocab
        self._bufs: dict[tuple[int, int], tuple[torch.Tensor, np.ndarray]] = {}

    def fetch(self, logits: torch.Tensor) -> np.ndarray:
        b, k = logits.shape[0], logits.shape[1]
        buf = self._bufs.get((b, k))
        if buf is None:
            if len(self._bufs) > 16:
                self._bufs.clear()
            host = torch.empty((b, k, self.vocab), dtype=torch.float32, pin_memory=self.device.type == "cuda")
            buf = self._bufs[(b, k)] = (host, host.numpy())
        host, arr = buf
        if self.device.type == "cuda":
            host.copy_(logits, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()  # the decoders sample on the host now
        else:
            host.copy_(logits)
        return arr


def check_step(inputs: StepInputs, batch: int, s: int) -> Key:
    """The step's graph key (B, T, K, S), after the shape checks every backend makes."""
    b, t = inputs.input_ids.shape
    k = inputs.logits_index.shape[1]
    if b != batch:
        raise ValueError(f"step has {b} batch rows; this engine's cache has {batch}")
    if inputs.attention_mask.shape != (b, 1, t, s + t):
        raise ValueError(f"attention_mask shape {inputs.attention_mask.shape}, expected {(b, 1, t, s + t)}")
    return (b, t, k, s)


def check_model(model: torch.nn.Module, spec: ModelSpec, where: str) -> None:
    """Refuse a checkpoint that does not match the manifest (a swapped or edited model folder)."""
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", 0)
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else 0)
    got = {
        "num_layers": cfg.num_hidden_layers,
        "num_kv_heads": getattr(cfg, "num_key_value_heads", heads),
        "head_dim": head_dim,
        "vocab_size": model.get_output_embeddings().weight.shape[0],
    }
    bad = [f"{k} {v} (manifest: {getattr(spec, k)})" for k, v in got.items() if v != getattr(spec, k)]
    if bad:
        raise EngineFolderError(f"the model in {where} does not match the engine's manifest: {', '.join(bad)}; re-export the engine")


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


class TorchEngine(SlotCacheEngine):
    def __init__(
        self,
        model: torch.nn.Module,
        spec: ModelSpec,
        device: str = "cpu",
        threads: int | None = None,
        batch: int = 1,
        dtype: str | None = None,
        cuda_graphs: bool = True,
        max_decode_tokens: int = DEFAULT_MAX_DECODE_TOKENS,
        capturer: Capturer | None = None,
    ) -> None:
        from mtad_trt.export.wrapper import ContractWrapper

        dev = torch_device(device)
        if dev.type == "cpu" and threads:
            torch.set_num_threads(threads)  # process-wide: torch has no per-module thread pool
        name = runtime_dtype(spec.dtype, dev, dtype)
        torch_dtype = TORCH_DTYPES[name]
        self.spec = replace(spec, dtype=name)
        self.device = dev
        self.name = f"torch-{dev.type}"
        self.batch = batch
        self.wrapper = ContractWrapper(model.to(device=dev, dtype=torch_dtype)).eval()
        self.cache = TorchKVCache(self.spec, batch, dev, torch_dtype)
        if capturer is None and cuda_graphs and dev.type == "cuda":
            capturer = TorchCudaCapturer(dev)
        self.runner: GraphRunner[StaticInputs] = GraphRunner(capturer, max_decode_tokens, name=self.name)
        self.host = HostLogits(dev, spec.vocab_size)
        self._new_kv: list[torch.Tensor] = []

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        manifest: Manifest,
        role: str,
        device: str = "cpu",
        threads: int = 1,
        **kwargs,
    ) -> TorchEngine:
        """Load the role's Hugging Face model: `<folder>/<role>/hf` if the export kept one, else its source."""
        from mtad_trt.export.sources import load_model, resolve

        entry = manifest.role(role)
        dev = torch_device(device)  # before the (slow) model load
        path = model_path(Path(folder), role, entry.source)
        dtype = runtime_dtype(entry.spec.dtype, dev, kwargs.pop("dtype", None))
        model = load_model(resolve(str(path)), dtype=dtype)
        check_model(model, entry.spec, str(path))
        return cls(model, entry.spec, device=device, threads=threads, dtype=dtype, **kwargs)

    # -- cache (capacity/reserve/reset/keep/move come from SlotCacheEngine) ----
    @property
    def graph_stats(self) -> dict[str, int]:
        return self.runner.stats


    # -- step --------------------------------------------------------------------------------
    def step(self, inputs: StepInputs) -> np.ndarray:
        key = check_step(inputs, self.batch, self.cache.size)
        bufs = self.runner.buffers(key, lambda: StaticInputs.alloc(key, self.device))
        bufs.load(inputs)
        views = self.cache.views

        def forward() -> tuple[torch.Tensor, ...]:
            return self.wrapper(*bufs.tensors(), *views)

        with torch.no_grad():
            logits, *new_kv = self.runner.run(key, forward)
        self._new_kv = new_kv
        return self.host.fetch(logits)

    def close(self) -> None:
        self.runner.clear()
        self._new_kv = []
        self.wrapper = None


def model_path(folder: Path, role: str, source: dict) -> Path:
    """Where the role's HF weights are: the engine's own copy first, then the recorded source."""
    local = folder / role / "hf"
    if local.exists():
        return local
    given = source.get("path")
    if given:
        for p in (Path(given).expanduser(), folder / given):
            if p.exists():
                return p
    raise EngineFolderError(
        f"the torch backend needs the {role} model's weights: neither {local} nor its source "
        f"{given or '(none recorded)'} exists; put the Hugging Face folder or .gguf back, or use --backend ort"
    )
