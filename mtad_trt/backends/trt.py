"""TensorRT backend: a built plan per role, buffers as torch CUDA tensors (docs/graph-contract.md §4, §7).

Which plan may run here is `trt_plans`' job. A CUDA graph is valid only for the state of the
execution context it was captured under (shapes, addresses, profile), so each graph key gets a
context of its own, bound once and never changed; steps that are never captured (prefill, graphs
off) share one context per profile. All contexts use user-managed device memory, one shared
scratch buffer: they run one at a time on the runner's own stream. The TensorRT facts this relies
on, with sources, are in docs/gpu.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtad_trt.backends.cuda_graphs import Capturer, GraphRunner, StaticInputs, TorchCudaCapturer
from mtad_trt.backends.device import DTYPE_NAMES, HostLogits, StreamRunner, on_stream, runner_stream
from mtad_trt.backends.kvcache import ALIGN_BYTES, TorchKVCache, aligned_zeros
from mtad_trt.backends.trt_plans import (
    PROFILE_DECODE,
    PROFILE_PREFILL,
    import_tensorrt,
    machine_info,
    profile_problems,
    rebuild_command,
    select_plan,
)
from mtad_trt.contract import (
    HEAD_OUTPUTS,
    LOGITS,
    LOGSUMEXP,
    SLIDING_MASK,
    STEP_INPUTS,
    TOPK_INDICES,
    TOPK_VALUES,
    Key,
    ModelSpec,
    StepInputs,
    StepOut,
    check_step,
)
from mtad_trt.errors import BackendUnavailable, EngineFolderError, MtadError
from mtad_trt.folder.manifest import Manifest

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
class Binding:
    """An execution context and the state it is bound to: (key, buffers, KV-cache address)."""

    context: Any
    profile: int
    state: tuple[Any, ...] | None = None


@dataclass(eq=False)  # compared by identity: a binding remembers which buffers it points at
class TrtBuffers:
    """A key's static I/O (every tensor 256-byte aligned): the step inputs, and outputs TensorRT
    writes into. `binding` is the key's own execution context when the key may be captured."""

    inputs: StaticInputs
    logits: torch.Tensor
    new_kv: list[torch.Tensor]
    head: list[torch.Tensor] = field(default_factory=list)  # top-k values, indices, logsumexp (graphs with a head)
    binding: Binding | None = None


def _ok(call: Any, *args: Any) -> bool:
    """A TensorRT setter's verdict: False, or the RuntimeError some Python bindings raise instead."""
    try:
        return bool(call(*args))
    except RuntimeError:
        return False


class TrtRunner(StreamRunner):
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
        self.plan_path = plan_path
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.cuda_engine = self._deserialize(plan_path)
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
        problems = profile_problems(self.cuda_engine, plan.get("profiles", []), self.spec.input_names)
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise EngineFolderError(
                f"the manifest's optimization profiles for {plan_path} do not match the plan's own: "
                f"{'; '.join(problems[:3])}{more}; rebuild it with `{self._rebuild}`"
            )
        names = [p["name"] for p in plan["profiles"]]
        self._profiles = {n: names.index(n) for n in (PROFILE_PREFILL, PROFILE_DECODE)}
        self._profile_shapes = {p["name"]: p["shapes"] for p in plan["profiles"]}
        self.stream = runner_stream(self.device)  # every device op of this runner goes here (backends/device.py)
        self._handle = int(self.stream.cuda_stream)
        with on_stream(self.stream):
            self.cache = TorchKVCache(self.spec, batch, self.device, kv_dtype)
            self._scratch = self._device_memory()
        self._eager: dict[int, Binding] = {}  # per profile: the context of steps that are never captured
        self.contexts_created = 0
        if capturer is None and cuda_graphs and self.device.type == "cuda":
            capturer = TorchCudaCapturer(self.device, stream=self.stream)
        self.runner: GraphRunner[TrtBuffers] = GraphRunner(capturer, self.max_decode_tokens, name="trt")
        self.host = HostLogits(self.device, spec.vocab_size, self.stream)
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

    def _deserialize(self, plan_path: Path) -> Any:
        """The engine, or a refusal: TensorRT returns None (and logs why) rather than raising."""
        engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if engine is None:
            raise EngineFolderError(
                f"TensorRT could not load the plan {plan_path} (see its log above: a truncated or corrupt "
                f"file, or one from another TensorRT build); rebuild it with `{self._rebuild}`"
            )
        return engine

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
        if self.spec.topk_head:
            want.update({TOPK_VALUES: (False, torch.float32), TOPK_INDICES: (False, torch.int64),
                         LOGSUMEXP: (False, torch.float32)})
        problems = [f"{n} ({'input' if inp else 'output'} {dt})" for n, (inp, dt) in want.items() if io.get(n) != (inp, dt)]
        for past, new in self.spec.kv_names:
            if not io.get(past, (False,))[0] or io.get(new, (True,))[0]:
                problems.append(f"{past} / {new}")
        if problems:
            raise EngineFolderError(
                f"the plan does not follow the graph contract: missing or mistyped {', '.join(problems)}; re-export and rebuild"
            )
        return io

    def _device_memory(self) -> torch.Tensor | None:
        """One scratch buffer of the engine's device-memory size (the most any profile needs),
        shared by every context: they never run concurrently (one stream)."""
        eng = self.cuda_engine
        size = int(eng.device_memory_size_v2 if hasattr(eng, "device_memory_size_v2") else eng.device_memory_size)  # 10.0: no _v2
        return aligned_zeros((size,), torch.uint8, self.device) if size > 0 else None

    # -- cache (bucket/reserve/reset/keep/move come from StreamRunner, on self.stream) ----
    @property
    def graph_stats(self) -> dict[str, int]:
        return self.runner.stats

    # -- execution contexts ------------------------------------------------------------------
    def _new_context(self, profile: int) -> Any:
        """A context on user-managed memory (the shared scratch buffer), switched to `profile`."""
        ctx = self.cuda_engine.create_execution_context(self._trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:  # TensorRT returns None (and logs why) rather than raising: usually GPU memory
            raise BackendUnavailable(
                f"TensorRT could not create execution context {self.contexts_created + 1} of the plan "
                f"{self.plan_path} (see its log above; usually the GPU is out of memory): free GPU memory, "
                f"or rebuild with smaller limits (--max-batch, --max-seq-len): `{self._rebuild}`"
            )
        if self._scratch is not None:
            ptr, size = self._scratch.data_ptr(), self._scratch.numel()
            if hasattr(ctx, "set_device_memory"):  # TensorRT >= 10.1
                ctx.set_device_memory(ptr, size)
            else:
                ctx.device_memory = ptr
        if not _ok(ctx.set_optimization_profile_async, profile, self._handle):
            raise MtadError(f"TensorRT refused to select optimization profile {profile} on a new execution context")
        self.contexts_created += 1
        return ctx

    def _context(self, key: Key, bufs: TrtBuffers) -> Any:
        """The execution context for this step, bound to `bufs` and the cache views."""
        phase = PROFILE_DECODE if key[1] <= self.max_decode_tokens else PROFILE_PREFILL
        profile = self._profiles[phase]
        kv = self.cache.views[0].data_ptr()  # every view is a prefix of one allocation's rows: fixed with this
        if self.runner.keeps(key):  # a graph may bake this context in: bound once, never changed
            b = bufs.binding
            if b is None:
                ctx = self._new_context(profile)
                self._bind(ctx, phase, bufs)
                b = bufs.binding = Binding(ctx, profile, (key, kv))
            elif b.state != (key, kv):
                raise MtadError(
                    f"internal error: the KV cache of graph key {key} moved ({b.state} -> {(key, kv)}); "
                    "its context and graph would point at freed memory"
                )
            return b.context
        b = self._eager.get(profile)
        if b is None:
            b = self._eager[profile] = Binding(self._new_context(profile), profile)
        state = (key, bufs, kv)
        if b.state != state:  # never captured: rebinding is ordinary use of a context
            b.state = None
            self._bind(b.context, phase, bufs)
            b.state = state
        return b.context

    def _bind(self, ctx: Any, phase: str, bufs: TrtBuffers) -> None:
        """Input shapes, then the output shapes TensorRT infers compared with the buffers, then every address."""
        rows = bufs.logits.shape[0]  # a step may use the first B rows of the cache (a contiguous prefix)
        inputs = list(zip(self.spec.step_names, bufs.inputs.tensors(), strict=True))
        inputs += [(name, view[:rows]) for (name, _), view in zip(self.spec.kv_names, self.cache.views, strict=True)]
        outputs = [(LOGITS, bufs.logits), *zip(HEAD_OUTPUTS, bufs.head, strict=False)]
        outputs += [(name, t) for (_, name), t in zip(self.spec.kv_names, bufs.new_kv, strict=True)]
        self._set_input_shapes(ctx, phase, inputs)
        self._check_output_shapes(ctx, outputs)
        self._set_addresses(ctx, inputs + outputs)

    def _set_input_shapes(self, ctx: Any, phase: str, inputs: list[tuple[str, torch.Tensor]]) -> None:
        """Each input's shape is its buffer's: TensorRT reads exactly that many bytes at its address."""
        for name, tensor in inputs:
            if not _ok(ctx.set_input_shape, name, tuple(tensor.shape)):
                lo, _, hi = self._profile_shapes[phase][name]
                raise MtadError(
                    f"{name} shape {tuple(tensor.shape)} is outside the plan's {phase} profile (min {lo}, max {hi}); "
                    f"rebuild it with larger limits: `{self._rebuild}`, raising --max-prefill-tokens, "
                    "--max-decode-tokens or --max-batch"
                )

    def _check_output_shapes(self, ctx: Any, outputs: list[tuple[str, torch.Tensor]]) -> None:
        """TensorRT writes the shapes it infers, whatever the buffer holds: they must be the buffers'."""
        for name, tensor in outputs:
            got = tuple(int(d) for d in ctx.get_tensor_shape(name))
            if got != tuple(tensor.shape):
                raise EngineFolderError(
                    f"plan output {name} has shape {got} for this step where the manifest's graph contract gives "
                    f"{tuple(tensor.shape)}: the plan and its manifest disagree; re-export the engine and rebuild "
                    f"(`{self._rebuild}`)"
                )

    def _set_addresses(self, ctx: Any, tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Every address, each checked first: a dense (contiguous) tensor, 256-byte aligned."""
        for name, tensor in tensors:
            if not tensor.is_contiguous():  # TensorRT reads and writes dense row-major memory at the address
                raise MtadError(f"internal error: {name} is not contiguous (strides {tensor.stride()}); "
                                "TensorRT would read or write the wrong elements")
            ptr = tensor.data_ptr()
            if ptr % ALIGN_BYTES:
                raise MtadError(f"{name} is at address {ptr:#x}, not {ALIGN_BYTES}-byte aligned as TensorRT requires")
            if not _ok(ctx.set_tensor_address, name, ptr):
                raise MtadError(f"TensorRT refused the address {ptr:#x} of {name}")

    # -- step --------------------------------------------------------------------------------
    def _alloc(self, key: Key) -> TrtBuffers:
        b, t, k, _ = key
        spec = self.spec
        kv_dtype = self._io[spec.kv_names[0][1]][1]
        return TrtBuffers(
            inputs=StaticInputs.alloc(key, self.device, self.spec.has_sliding_layers, zeros=aligned_zeros),
            logits=aligned_zeros((b, k, spec.vocab_size), self._io[LOGITS][1], self.device),
            new_kv=[aligned_zeros((b, spec.num_kv_heads, t, spec.head_dim), kv_dtype, self.device)
                    for _ in range(2 * spec.num_layers)],
            head=[aligned_zeros(shape, dtype, self.device) for shape, dtype in (
                ((b, k, spec.topk_head), torch.float32), ((b, k, spec.topk_head), torch.int64), ((b, k), torch.float32))]
            if spec.topk_head else [],
        )

    def _enqueue(self, ctx: Any, bufs: TrtBuffers) -> TrtBuffers:
        if not ctx.execute_async_v3(self._handle):  # the runner's stream, also the capture stream
            raise MtadError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        return bufs

    def step(self, inputs: StepInputs) -> StepOut:
        key = check_step(inputs, self.batch, self.cache.size, self.spec)
        with on_stream(self.stream):
            bufs = self.runner.buffers(key, lambda: self._alloc(key))
            bufs.inputs.load(inputs)
            ctx = self._context(key, bufs)
            self.runner.run(key, lambda: self._enqueue(ctx, bufs))
            self._new_kv = bufs.new_kv
            top = self.host.fetch(*bufs.head) if bufs.head else None  # small: now; the logits only if read
            return StepOut(fetch=lambda: self.host.fetch(bufs.logits), top=top, vocab=self.spec.vocab_size)

    def close(self) -> None:
        self.stream.synchronize()
        self.runner.clear()
        self._eager.clear()
        self._new_kv = []
        self._scratch = None
        self.cuda_engine = None
