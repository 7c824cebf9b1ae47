"""ONNX Runtime backend: the CPU default.

All graph I/O is bound by pointer (IO binding) to buffers this object owns: the cache views,
and output buffers preallocated per step shape. A step allocates nothing but the binding's small
bookkeeping, and nothing is copied out of ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtad_trt.backends.kvcache import HostKVCache
from mtad_trt.backends.runner import ShapeCache, SlotCacheRunner
from mtad_trt.contract import HEAD_OUTPUTS, LOGITS, NP_DTYPES, ModelSpec, StepInputs, StepOut, check_step
from mtad_trt.errors import EngineFolderError


class OrtRunner(SlotCacheRunner):
    def __init__(
        self,
        onnx_path: str | Path,
        spec: ModelSpec,
        threads: int = 1,
        batch: int = 1,
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
        # CPU only: the GPU path is torch / TensorRT (an ONNX Runtime CUDA provider with device IO
        # binding is not built; `backends.choose_backend` refuses --backend ort --device cuda).
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.name = "ort-cpu"
        self.cache = HostKVCache(spec, batch=batch)
        self.batch = batch
        self._dtype = NP_DTYPES[spec.dtype]
        self._out: ShapeCache[tuple[int, int, int], tuple] = ShapeCache(self._alloc)
        self._new_kv: list[np.ndarray] = []
        self._binding = self.session.io_binding()
        names = {i.name for i in self.session.get_inputs()} | {o.name for o in self.session.get_outputs()}
        want = set(spec.input_names) | set(spec.output_names)
        if names != want:
            missing, extra = sorted(want - names), sorted(names - want)
            raise EngineFolderError(
                f"{onnx_path} does not follow the graph contract of its manifest "
                f"(missing {missing or 'none'}, unexpected {extra or 'none'}): re-export the engine"
            )

    # -- step --------------------------------------------------------------------------------
    def _alloc(self, key: tuple[int, int, int]) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        b, t, k = key
        s = self.spec
        logits = np.empty((b, k, s.vocab_size), np.float32)
        head = []
        if s.topk_head:
            head = [np.empty((b, k, s.topk_head), np.float32), np.empty((b, k, s.topk_head), np.int64),
                    np.empty((b, k), np.float32)]
        kv = [np.empty((b, s.num_kv_heads, t, s.head_dim), self._dtype) for _ in range(2 * s.num_layers)]
        return logits, head, kv

    row_window = True  # the cache is bound by pointer per step: any window of rows is a contiguous view

    def step(self, inputs: StepInputs, first_row: int = 0) -> StepOut:
        b, t, k, _ = check_step(inputs, self.batch - first_row, self.cache.size, self.spec)
        logits, head, new_kv = self._out.get((b, t, k))
        bind = self._binding
        bind.clear_binding_inputs()
        bind.clear_binding_outputs()
        # Bound by pointer: the arrays must be contiguous and stay alive until the run returns.
        held = [np.ascontiguousarray(a) for a in inputs.arrays()]
        for name, arr in zip(self.spec.step_names, held, strict=True):
            bind.bind_input(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        for (in_name, out_name), view, new in zip(self.spec.kv_names, self.cache.views, new_kv, strict=True):
            cache = view[first_row : first_row + b]  # a window of whole rows: contiguous
            bind.bind_input(in_name, "cpu", 0, cache.dtype, cache.shape, cache.ctypes.data)
            bind.bind_output(out_name, "cpu", 0, new.dtype, new.shape, new.ctypes.data)
        bind.bind_output(LOGITS, "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        for name, arr in zip(HEAD_OUTPUTS, head, strict=False):
            bind.bind_output(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        self.session.run_with_iobinding(bind)
        self._new_kv, self._first_row = new_kv, first_row
        return StepOut(logits, top=tuple(head) if head else None, vocab=self.spec.vocab_size)

    def close(self) -> None:
        self._binding = None
        self.session = None
        self._out.clear()
