"""TensorRT backend: a built plan per role, buffers as torch CUDA tensors (engine-contract §4, §7).

Which plan may run here is `trt_plans`' job. Per step: choose the optimization profile by T
(prefill vs decode/verify), set every input shape and tensor address (skipped when the key and
buffers are those already bound), then `execute_async_v3` on torch's current stream — through
the shared CUDA-graph runner, so decode/verify steps replay a captured graph.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtad_trt.backends.device import DTYPE_NAMES, HostLogits
from mtad_trt.backends.trt_plans import (
    PROFILE_DECODE,
    PROFILE_PREFILL,
    import_tensorrt,
    machine_info,
    rebuild_command,
    select_plan,
)
from mtad_trt.contract import LOGITS, SLIDING_MASK, STEP_INPUTS, Key, ModelSpec, StepInputs, check_step
from mtad_trt.cuda_graphs import Capturer, GraphRunner, StaticInputs, TorchCudaCapturer
from mtad_trt.errors import BackendUnavailable, EngineFolderError, MtadError
from mtad_trt.kvcache import TorchKVCache
from mtad_trt.manifest import Manifest
from mtad_trt.runner import SlotCacheRunner

STEP_DTYPES = {name: {np.int64: torch.int64, np.bool_: torch.bool}[dt] for name, dt in STEP_INPUTS.items()}
STEP_DTYPES[SLIDING_MASK] = torch.bool


TORCH_OF_TRT = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
}


@dataclass
class TrtBuffers:
    """A key's static I/O: the step inputs, and outputs TensorRT writes into."""

    inputs: StaticInputs
    logits: torch.Tensor
    new_kv: list[torch.Tensor]


class TrtRunner(SlotCacheRunner):
    def __init__(
        self,
        plan_path: str | Path,
        spec: ModelSpec,
        plan: dict[str, Any],
        batch: int = 1,
        device: str = "cuda",
        cuda_graphs: bool = True,
        capturer: Capturer | None = None,
    ) -> None:
        """`device="cpu"` exists only for the CPU test harness (a fake `tensorrt` module)."""
        trt = import_tensorrt()
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("TensorRT needs an NVIDIA GPU with CUDA; torch sees none here")
        plan_path = Path(plan_path)
        folder = plan_path.parents[len(Path(plan.get("path", "x/x")).parts) - 1]
        self._rebuild = rebuild_command(plan, folder)
        if not plan_path.is_file():
            raise EngineFolderError(f"missing TensorRT plan {plan_path}: rebuild it with `{self._rebuild}`")
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.cuda_engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.cuda_engine is None:
            raise EngineFolderError(f"TensorRT could not load {plan_path} (see its log above); rebuild it with `{self._rebuild}`")
        self.context = self.cuda_engine.create_execution_context()
        if self.context is None:
            raise MtadError(f"TensorRT could not create an execution context for {plan_path} (out of GPU memory?)")
        self.name = "trt"
        self.batch = batch
        self.plan = plan
        if batch > int(plan.get("max_batch", batch)):
            raise MtadError(f"batch {batch} exceeds the plan's max batch {plan['max_batch']}; rebuild with `--max-batch {batch}`")
        self.spec = replace(spec, max_seq_len=min(spec.max_seq_len, int(plan.get("max_seq_len", spec.max_seq_len))))
        self._io = self._io_tensors()
        kv_dtype = self._io[self.spec.kv_names[0][0]][1]
        self.spec = replace(self.spec, dtype=DTYPE_NAMES.get(kv_dtype, spec.dtype))  # a weakly typed build keeps fp32 I/O
        self.max_decode_tokens = int(plan["max_decode_tokens"])
        names = [p["name"] for p in plan["profiles"]]
        self._profiles = {n: names.index(n) for n in (PROFILE_PREFILL, PROFILE_DECODE)}
        self._profile_shapes = {p["name"]: p["shapes"] for p in plan["profiles"]}
        self._active_profile: int | None = None
        self._bound: tuple[Key, TrtBuffers] | None = None
        self.cache = TorchKVCache(self.spec, batch, self.device, kv_dtype)
        if capturer is None and cuda_graphs and self.device.type == "cuda":
            capturer = TorchCudaCapturer(self.device)
        self.runner: GraphRunner[TrtBuffers] = GraphRunner(capturer, self.max_decode_tokens, name="trt")
        self.host = HostLogits(self.device, spec.vocab_size)
        self._new_kv: list[torch.Tensor] = []

    @classmethod
    def from_folder(cls, folder: str | Path, manifest: Manifest, role: str, **kwargs) -> TrtRunner:
        """The role's newest plan that matches this machine; a clear refusal otherwise."""
        trt = import_tensorrt()
        entry = manifest.role(role)
        if not entry.plans:
            raise EngineFolderError(f"{folder} has no TensorRT plan for the {role} model: build one with `mtad-trt build {folder}`")
        plan, reasons = select_plan(entry.plans, *machine_info(trt), folder=folder)
        if plan is None:
            raise EngineFolderError(reasons[0])
        return cls(Path(folder) / plan["path"], entry.spec, plan, **kwargs)

    def _io_tensors(self) -> dict[str, tuple[bool, torch.dtype]]:
        """name -> (is input, torch dtype), checked against the graph contract."""
        trt, eng = self._trt, self.cuda_engine
        io = {}
        for i in range(eng.num_io_tensors):
            name = eng.get_tensor_name(i)
            dt = eng.get_tensor_dtype(name)
            if dt.name not in TORCH_OF_TRT:
                raise EngineFolderError(f"plan tensor {name} has unsupported dtype {dt.name}")
            io[name] = (eng.get_tensor_mode(name) == trt.TensorIOMode.INPUT, TORCH_OF_TRT[dt.name])
        want = {n: (True, STEP_DTYPES[n]) for n in self.spec.step_names}
        want[LOGITS] = (False, torch.float32)
        problems = [f"{n} ({'input' if inp else 'output'} {dt})" for n, (inp, dt) in want.items() if io.get(n) != (inp, dt)]
        for past, new in self.spec.kv_names:
            if not io.get(past, (False,))[0] or io.get(new, (True,))[0]:
                problems.append(f"{past} / {new}")
        if problems:
            raise EngineFolderError(
                f"the plan does not follow the graph contract: missing or mistyped {', '.join(problems)}; re-export and rebuild"
            )
        return io

    # -- cache (bucket/reserve/reset/keep/move come from SlotCacheRunner) ----
    @property
    def graph_stats(self) -> dict[str, int]:
        return self.runner.stats


    # -- step --------------------------------------------------------------------------------
    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def _alloc(self, key: Key) -> TrtBuffers:
        b, t, k, _ = key
        s = self.spec
        kv_dtype = self._io[s.kv_names[0][1]][1]
        return TrtBuffers(
            inputs=StaticInputs.alloc(key, self.device, self.spec.has_sliding_layers),
            logits=torch.empty((b, k, s.vocab_size), dtype=self._io[LOGITS][1], device=self.device),
            new_kv=[
                torch.empty((b, s.num_kv_heads, t, s.head_dim), dtype=kv_dtype, device=self.device)
                for _ in range(2 * s.num_layers)
            ],
        )

    def _bind(self, key: Key, bufs: TrtBuffers) -> None:
        """Profile, shapes and addresses for this key: host-side context state, set outside any capture."""
        if self._bound is not None and self._bound[0] == key and self._bound[1] is bufs:
            return
        ctx = self.context
        phase = PROFILE_DECODE if key[1] <= self.max_decode_tokens else PROFILE_PREFILL
        profile = self._profiles[phase]
        if profile != self._active_profile:
            if not ctx.set_optimization_profile_async(profile, self._stream()):
                raise MtadError(f"TensorRT refused to switch to optimization profile {phase}")
            self._active_profile = profile
        inputs = list(zip(self.spec.step_names, bufs.inputs.tensors(), strict=True))
        inputs += [(name, view[: key[0]]) for (name, _), view in zip(self.spec.kv_names, self.cache.views, strict=True)]
        for name, tensor in inputs:
            if not ctx.set_input_shape(name, tuple(tensor.shape)):
                lo, _, hi = self._profile_shapes[phase][name]
                raise MtadError(
                    f"{name} shape {tuple(tensor.shape)} is outside the plan's {phase} profile (min {lo}, max {hi}); "
                    f"rebuild it with larger limits: `{self._rebuild}`, raising --max-prefill-tokens, "
                    "--max-decode-tokens or --max-batch"
                )
            ctx.set_tensor_address(name, tensor.data_ptr())
        ctx.set_tensor_address(LOGITS, bufs.logits.data_ptr())
        for (_, name), tensor in zip(self.spec.kv_names, bufs.new_kv, strict=True):
            ctx.set_tensor_address(name, tensor.data_ptr())
        self._bound = (key, bufs)

    def _enqueue(self, bufs: TrtBuffers) -> TrtBuffers:
        if not self.context.execute_async_v3(self._stream()):  # the capture stream, inside a capture
            raise MtadError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        return bufs

    def step(self, inputs: StepInputs) -> np.ndarray:
        key = check_step(inputs, self.batch, self.cache.size, self.spec)
        bufs = self.runner.buffers(key, lambda: self._alloc(key))
        bufs.inputs.load(inputs)
        self._bind(key, bufs)
        self.runner.run(key, lambda: self._enqueue(bufs))
        self._new_kv = bufs.new_kv
        return self.host.fetch(bufs.logits)

    def close(self) -> None:
        self.runner.clear()
        self._bound = None
        self._new_kv = []
        self.context = None
        self.cuda_engine = None
