"""ONNX Runtime backend: the CPU default, and CUDA where onnxruntime-gpu and a GPU exist.

All graph I/O is bound by pointer (IO binding) to buffers this object owns: the cache views,
and output buffers preallocated per step shape. A step allocates nothing but the binding's small
bookkeeping, and nothing is copied out of ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtad_trt.engine import SlotCacheEngine, StepInputs
from mtad_trt.errors import BackendUnavailable, EngineFolderError
from mtad_trt.kvcache import NP_DTYPES, HostKVCache
from mtad_trt.manifest import ModelSpec


class OrtEngine(SlotCacheEngine):
    def __init__(
        self,
        onnx_path: str | Path,
        spec: ModelSpec,
        threads: int = 1,
        batch: int = 1,
        provider: str = "cpu",
    ) -> None:
        import onnxruntime as ort

        if not Path(onnx_path).is_file():
            raise EngineFolderError(f"missing graph {onnx_path}: re-export the engine")
        self.spec = spec
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if provider == "cuda":
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=providers)
        got = self.session.get_providers()
        if provider == "cuda" and got[0] != "CUDAExecutionProvider":
            # onnxruntime-gpu silently falls back to CPU: refuse instead of running slow.
            raise BackendUnavailable(
                f"ONNX Runtime did not start the CUDA provider (got {got}); install onnxruntime-gpu "
                "matching your CUDA, or use --device cpu"
            )
        if provider == "cuda":
            raise BackendUnavailable("ONNX Runtime CUDA execution with host IO binding is not built yet; use --backend torch")
        self.name = "ort-cpu"
        self.cache = HostKVCache(spec, batch=batch)
        self.batch = batch
        self._dtype = NP_DTYPES[spec.dtype]
        self._out: dict[tuple[int, int, int], tuple[np.ndarray, list[np.ndarray]]] = {}
        self._new_kv: list[np.ndarray] = []
        self._binding = self.session.io_binding()
        names = {i.name for i in self.session.get_inputs()}
        missing = {"input_ids", "position_ids", "attention_mask", "logits_index"} - names
        if missing:
            raise EngineFolderError(f"{onnx_path} does not follow the graph contract: no input {sorted(missing)}")


    # -- step --------------------------------------------------------------------------------
    def _outputs(self, b: int, t: int, k: int) -> tuple[np.ndarray, list[np.ndarray]]:
        key = (b, t, k)
        if key not in self._out:
            s = self.spec
            logits = np.empty((b, k, s.vocab_size), np.float32)
            kv = [np.empty((b, s.num_kv_heads, t, s.head_dim), self._dtype) for _ in range(2 * s.num_layers)]
            if len(self._out) > 64:  # prefill shapes vary; keep the decode/verify ones
                self._out.clear()
            self._out[key] = (logits, kv)
        return self._out[key]

    def step(self, inputs: StepInputs) -> np.ndarray:
        b, t = inputs.input_ids.shape
        k = inputs.logits_index.shape[1]
        s = self.cache.size
        if inputs.attention_mask.shape != (b, 1, t, s + t):
            raise ValueError(f"attention_mask shape {inputs.attention_mask.shape}, expected {(b, 1, t, s + t)}")
        logits, new_kv = self._outputs(b, t, k)
        bind = self._binding
        bind.clear_binding_inputs()
        bind.clear_binding_outputs()
        # Bound by pointer: the arrays must be contiguous and stay alive until the run returns.
        held = [np.ascontiguousarray(a) for a in (inputs.input_ids, inputs.position_ids, inputs.attention_mask, inputs.logits_index)]
        for name, arr in zip(("input_ids", "position_ids", "attention_mask", "logits_index"), held, strict=False):
            bind.bind_input(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        for (in_name, out_name), cache, new in zip(self.spec.kv_names, self.cache.views[: len(new_kv)], new_kv, strict=False):
            bind.bind_input(in_name, "cpu", 0, cache.dtype, cache.shape, cache.ctypes.data)
            bind.bind_output(out_name, "cpu", 0, new.dtype, new.shape, new.ctypes.data)
        bind.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        self.session.run_with_iobinding(bind)
        self._new_kv = new_kv
        return logits

    def close(self) -> None:
        self._binding = None
        self.session = None
        self._out.clear()
