"""PyTorch backend: the contract wrapper itself, on CPU or CUDA.

It runs the same `ContractWrapper` that export traces, so it is the parity reference for every
other backend, and the GPU path that can be measured where TensorRT is absent. On CUDA its
decode/verify steps replay CUDA graphs (`mtad_trt.backends.cuda_graphs`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from mtad_trt.backends.cuda_graphs import Capturer, GraphRunner, StaticInputs, TorchCudaCapturer
from mtad_trt.backends.device import (
    TORCH_DTYPES,
    HostLogits,
    StreamRunner,
    on_stream,
    runner_stream,
    runtime_dtype,
    torch_device,
)
from mtad_trt.backends.kvcache import TorchKVCache
from mtad_trt.contract import ModelSpec, StepInputs, StepOut, check_model, check_step
from mtad_trt.errors import EngineFolderError
from mtad_trt.folder.manifest import Manifest

DEFAULT_MAX_DECODE_TOKENS = 32  # widest step (verify chain / draft tree) that is graph-captured


class TorchRunner(StreamRunner):
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
        from mtad_trt.contract.wrapper import ContractWrapper

        dev = torch_device(device)
        if dev.type == "cpu" and threads:
            torch.set_num_threads(threads)  # process-wide: torch has no per-module thread pool
        name = runtime_dtype(spec.dtype, dev, dtype)
        torch_dtype = TORCH_DTYPES[name]
        self.spec = replace(spec, dtype=name)
        self.device = dev
        self.name = f"torch-{dev.type}"
        self.batch = batch
        self.wrapper = ContractWrapper(model.to(device=dev, dtype=torch_dtype), topk=spec.topk_head).eval()
        self.stream = runner_stream(dev)  # every device op of this runner goes here (backends/device.py)
        if dev.type == "cuda":
            self.stream.wait_stream(torch.cuda.current_stream(dev))  # the weights were moved on the caller's stream
        with on_stream(self.stream):
            self.cache = TorchKVCache(self.spec, batch, dev, torch_dtype)
        if capturer is None and cuda_graphs and dev.type == "cuda":
            capturer = TorchCudaCapturer(dev, stream=self.stream)
        self.runner: GraphRunner[StaticInputs] = GraphRunner(capturer, max_decode_tokens, name=self.name)
        self.host = HostLogits(dev, spec.vocab_size, self.stream)
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
    ) -> TorchRunner:
        """Load the role's Hugging Face model: `<folder>/<role>/hf` if the export kept one, else its source."""
        from mtad_trt.folder.checkpoint import load_model, open_path

        entry = manifest.role(role)
        dev = torch_device(device)  # before the (slow) model load
        path = model_path(Path(folder), role, entry.source)
        dtype = runtime_dtype(entry.spec.dtype, dev, kwargs.pop("dtype", None))
        model = load_model(open_path(str(path)), dtype=dtype)
        check_model(model, entry.spec, str(path))
        return cls(model, entry.spec, device=device, threads=threads, dtype=dtype, **kwargs)

    # -- cache (bucket/reserve/reset/keep/move come from StreamRunner, on self.stream) ----
    @property
    def graph_stats(self) -> dict[str, int]:
        return self.runner.stats


    # -- step --------------------------------------------------------------------------------
    def step(self, inputs: StepInputs) -> StepOut:
        key = check_step(inputs, self.batch, self.cache.size, self.spec)
        sliding = self.spec.has_sliding_layers
        views = [v[: key[0]] for v in self.cache.views]  # the first B rows: a contiguous prefix

        with on_stream(self.stream), torch.no_grad():
            bufs = self.runner.buffers(key, lambda: StaticInputs.alloc(key, self.device, sliding))
            bufs.load(inputs)

            def forward() -> tuple[torch.Tensor, ...]:
                return self.wrapper(*bufs.tensors(), *views)

            logits, *rest = self.runner.run(key, forward)
            n_head = 3 if self.spec.topk_head else 0
            head, self._new_kv = rest[:n_head], rest[n_head:]
            top = self.host.fetch(*head) if head else None  # small: fetched now; the logits only if read
            return StepOut(fetch=lambda: self.host.fetch(logits), top=top, vocab=self.spec.vocab_size)

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
