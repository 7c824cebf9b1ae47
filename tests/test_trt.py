"""TensorRT backend and plan building, without TensorRT or a GPU.

The pure parts (profiles, flag choice, refusals, plan compatibility) are tested directly. The
orchestration (`build_plans`, `TrtRunner`) runs against a fake `tensorrt` module that executes
the plan with ONNX Runtime through the addresses the runner binds, and is strict where
TensorRT's documentation is (docs/gpu.md): it refuses a graph replay on a context whose state
changed since capture, an enqueue on stream 0, an address that is not 256-byte aligned, an input
or output that would not fit its buffer, and a capture on a context that has not run uncaptured
since its state last changed. It fails the way TensorRT does, by return value: a parser that
reports its errors through `get_error`, `deserialize_cuda_engine` and `create_execution_context`
returning None. What this cannot show is that real TensorRT accepts the graph and the calls; see
docs/gpu.md and scripts/gpu_check.sh.
"""

from __future__ import annotations

import bisect
import ctypes
import enum
import json
import re
import sys
import types
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_torch_backend import SPEC, assert_same_logits, build_tiny_engine, drive

import mtad_trt.backends.trt as trt_backend
import mtad_trt.backends.trt_plans as trt_plans
import mtad_trt.export.build_trt as build_trt
from mtad_trt.backends.ort import OrtRunner
from mtad_trt.backends.rows import Row
from mtad_trt.backends.trt import TrtRunner
from mtad_trt.backends.trt_plans import check_plan_compat, import_tensorrt, select_plan, usable_plans
from mtad_trt.contract import ModelSpec
from mtad_trt.errors import BackendUnavailable, EngineFolderError, MtadError
from mtad_trt.export.build_trt import build_plans, choose_flags, plan_profiles, plan_role
from mtad_trt.folder.manifest import Manifest, RoleEntry

ORIN = ("10.3.0", "Orin", "8.7")
H100 = ("10.7.0", "NVIDIA H100 80GB HBM3", "9.0")


# -- pure planning --------------------------------------------------------------------------
def test_profiles_cover_buckets_and_phases() -> None:
    spec = ModelSpec(num_layers=2, num_kv_heads=2, head_dim=16, vocab_size=300, dtype="float16", max_seq_len=1024)
    prefill, decode = plan_profiles(spec, max_batch=4, max_decode_tokens=16, max_prefill_tokens=512)
    assert (prefill["name"], decode["name"]) == ("prefill", "decode")
    p, d = prefill["shapes"], decode["shapes"]
    assert set(p) == set(d) == {"input_ids", "position_ids", "attention_mask", "logits_index"} | {n for n, _ in spec.kv_names}
    assert p["input_ids"] == [[1, 1], [1, 256], [4, 512]]
    assert d["input_ids"] == [[1, 1], [4, 16], [4, 16]]
    assert d["logits_index"][2] == [4, 16] and p["logits_index"][2] == [4, 16]
    assert p["past_key_values.0.key"] == [[1, 2, 128, 16], [1, 2, 256, 16], [4, 2, 1024, 16]]
    for prof in (p, d):  # the mask's last axis is S + T at min, opt and max
        for i in range(3):
            assert prof["attention_mask"][i][3] == prof["past_key_values.1.value"][i][2] + prof["input_ids"][i][1]
        for lo, opt, hi in prof.values():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True))
    tuned = plan_profiles(spec, max_batch=4, max_decode_tokens=16, decode_opt_tokens=1)[1]["shapes"]  # issue 15 item 7
    assert tuned["input_ids"] == [[1, 1], [4, 1], [4, 16]] and tuned["logits_index"] == [[1, 1], [4, 1], [4, 16]]
    assert tuned["attention_mask"][1][2:] == [1, tuned["past_key_values.0.key"][1][2] + 1]
    with pytest.raises(MtadError, match="decode_opt_tokens must be between 1 and max_decode_tokens"):
        plan_profiles(spec, max_decode_tokens=16, decode_opt_tokens=17)
    small = plan_profiles(spec, max_seq_len=100, max_decode_tokens=4)  # one bucket below 128
    assert small[1]["shapes"]["past_key_values.0.key"][0][2] == 100 == small[1]["shapes"]["past_key_values.0.key"][2][2]
    with pytest.raises(MtadError, match="exceeds the graph's KV capacity"):
        plan_profiles(spec, max_seq_len=4096)


@pytest.mark.parametrize(
    ("major", "graph", "precision", "network", "builder", "strong"),
    [
        (10, "float32", "fp16", [], ["FP16"], False),  # weak typing: JetPack 6 / TRT 10.3 route
        (10, "float32", "bf16", [], ["BF16"], False),
        (10, "float16", "fp16", ["STRONGLY_TYPED"], [], True),
        (10, "float32", "fp32", ["STRONGLY_TYPED"], [], True),
        (11, "float16", "fp16", ["STRONGLY_TYPED"], [], True),
        (11, "bfloat16", "bf16", ["STRONGLY_TYPED"], [], True),
    ],
)
def test_flags_by_version(major, graph, precision, network, builder, strong) -> None:
    flags = choose_flags(major, graph, precision)
    assert (flags.network, flags.builder, flags.strongly_typed) == (network, builder, strong)
    assert "EXPLICIT_BATCH" not in flags.network
    assert flags.clear == (["TF32"] if precision == "fp32" else [])


def test_flag_refusals() -> None:
    with pytest.raises(MtadError, match="strongly typed networks only.*--dtype fp16`"):
        choose_flags(11, "float32", "fp16")
    with pytest.raises(MtadError, match="graph is float16.*--precision fp16"):
        choose_flags(10, "float16", "fp32")
    with pytest.raises(MtadError, match="graph is bfloat16"):
        choose_flags(11, "bfloat16", "fp16")
    with pytest.raises(MtadError, match="TensorRT 8.x is not supported"):
        choose_flags(8, "float16", "fp16")
    with pytest.raises(MtadError, match="unknown precision"):
        choose_flags(10, "float16", "int8")


def test_quantized_graph_refused(tmp_path) -> None:
    entry = RoleEntry(spec=SPEC, onnx="target/model.onnx", quantization={"scheme": "int4-matmulnbits"})
    with pytest.raises(MtadError, match="quantized \\(int4-matmulnbits\\).*unquantized"):
        plan_role(tmp_path, "target", entry, 10, "fp16", 1, None, 16, None)


def plan_entry(version: str = ORIN[0], gpu: str = ORIN[1], cc: str = ORIN[2], **kw) -> dict:
    return {
        "path": "target/model.plan",
        "tensorrt_version": version,
        "gpu_name": gpu,
        "compute_capability": cc,
        "precision": "fp16",
        "max_batch": 1,
        "max_seq_len": 2048,
        "max_decode_tokens": 16,
        "max_prefill_tokens": 2048,
        **kw,
    }


def test_plan_compat() -> None:
    assert check_plan_compat(plan_entry(), *ORIN) is None
    why = check_plan_compat(plan_entry(), *H100, folder="engines/qwen")
    assert "TensorRT 10.3.0 (this machine has 10.7.0)" in why
    assert "compute capability 8.7 (this GPU has 9.0)" in why
    assert why.endswith(
        "`mtad-trt build engines/qwen --precision fp16 --max-batch 1 --max-seq-len 2048 "
        "--max-decode-tokens 16 --max-prefill-tokens 2048`"
    )
    assert "GPU 'Orin'" in check_plan_compat(plan_entry(), "10.3.0", "NVIDIA A100", "8.7")
    plans = [plan_entry(tag="old"), plan_entry(*H100), plan_entry(tag="new")]
    assert select_plan(plans, *ORIN)[0]["tag"] == "new"
    plan, reasons = select_plan(plans[1:2], *ORIN)
    assert plan is None and "rebuild it here" in reasons[0]
    assert check_plan_compat(plan_entry(decode_opt_tokens=1), *H100).endswith("--decode-opt-tokens 1`")


# -- TensorRT missing -------------------------------------------------------------------------
def test_tensorrt_missing_is_one_clear_line(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(BackendUnavailable) as e:
        import_tensorrt()
    msg = str(e.value)
    assert "\n" not in msg and "pip install tensorrt" in msg and "JetPack" in msg
    manifest = Manifest(roles={"target": RoleEntry(spec=SPEC, onnx="target/model.onnx", plans=[plan_entry()])})
    manifest.save(tmp_path)
    with pytest.raises(BackendUnavailable, match="pip install tensorrt"):
        build_plans(tmp_path)
    with pytest.raises(BackendUnavailable, match="pip install tensorrt"):
        TrtRunner.from_folder(tmp_path, manifest, "target")
    assert usable_plans(manifest) is None
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # a placeholder wheel
    with pytest.raises(BackendUnavailable, match="placeholder"):
        import_tensorrt()


# -- a strict fake TensorRT, executed by ONNX Runtime -----------------------------------------
# Each rule is a documented TensorRT requirement (docs/gpu.md, "TensorRT facts"); a test may switch
# rules off to show one of them at a time.
RULES = frozenset({"replay", "stream", "align", "outputs", "inputs", "warm"})
ALIGN = 256

DataType = enum.Enum("DataType", "FLOAT HALF BF16 INT32 INT64 BOOL INT8 UINT8")
TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
ExecutionContextAllocationStrategy = enum.Enum("ExecutionContextAllocationStrategy", "STATIC ON_PROFILE_CHANGE USER_MANAGED")
NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})
BuilderFlag = enum.IntEnum("BuilderFlag", "FP16 BF16 TF32")
MemoryPoolType = enum.IntEnum("MemoryPoolType", "WORKSPACE")
ORT_TYPES = {"tensor(float)": (DataType.FLOAT, np.float32), "tensor(float16)": (DataType.HALF, np.float16),
             "tensor(int64)": (DataType.INT64, np.int64), "tensor(bool)": (DataType.BOOL, np.bool_)}


class FakeState:
    """What the fake knows beyond one context: enabled rules, an open capture, the live torch
    allocations (so a buffer's size can be checked before reading or writing it), the API level,
    and the failures a test asks for (operators the parser rejects, a limit on contexts)."""

    def __init__(self) -> None:
        self.rules: set[str] = set(RULES)
        self.capturing: list | None = None
        self.allocations: dict[int, tuple[Any, int]] = {}  # address -> (storage, bytes): held, so no address is reused
        self._starts: list[int] | None = None
        self.api = "10.1"  # "10.0": no device_memory_size_v2 / set_device_memory
        self.refusals: list[str] = []
        self.contexts: list[FakeContext] = []
        self.unsupported_ops: set[str] = set()  # ONNX operators the parser reports as errors
        self.max_contexts: int | None = None  # per engine; past it create_execution_context returns None
        self.log: list[str] = []  # what TensorRT would have logged for a failure it reports by return value

    def refuse(self, why: str) -> bool:
        print(f"fake tensorrt refused: {why}")  # shown with a failing test's captured output
        self.refusals.append(why)
        return False

    def extent(self, ptr: int) -> int | None:
        """Bytes from `ptr` to the end of the live torch allocation holding it, if any."""
        if self._starts is None:
            self._starts = sorted(self.allocations)
        i = bisect.bisect_right(self._starts, ptr) - 1
        if i < 0:
            return None
        start = self._starts[i]
        size = self.allocations[start][1]
        return start + size - ptr if ptr < start + size else None

    def record(self, t: torch.Tensor) -> None:
        try:
            st = t.untyped_storage()
            self.allocations[st.data_ptr()] = (st, st.nbytes())
            self._starts = None
        except RuntimeError:  # a FakeTensor (an ONNX export traces with them): no memory
            pass

    def record_buffer(self, t: torch.Tensor) -> None:
        """An aligned buffer carved out of a larger allocation: its own extent, not the allocation's
        (whose alignment slack would let a too-large read or write pass unnoticed)."""
        self.allocations[t.data_ptr()] = (t, t.numel() * t.element_size())
        self._starts = None

    def room(self, ptr: int, shape: tuple[int, ...], dtype) -> tuple[int, int | None]:
        """(bytes a tensor of `shape` needs at `ptr`, bytes its buffer has there or None)."""
        return int(np.prod(shape)) * np.dtype(dtype).itemsize, self.extent(ptr)


STATE = FakeState()


def at_address(ptr: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * n).from_address(ptr), dtype=dtype).reshape(shape)


class Logger:
    WARNING = 2

    def __init__(self, level: int = 2) -> None:
        self.level = level


class FakeNetwork:
    def __init__(self, flags: int) -> None:
        self.flags, self.onnx = flags, None


class FakeParserError:
    """TensorRT 10's IParserError: desc(), and the failing node's name and operator."""

    def __init__(self, desc: str, node: str = "", op: str = "") -> None:
        self._desc, self._node, self._op = desc, node, op

    def desc(self) -> str:
        return self._desc

    def node_name(self) -> str:
        return self._node

    def node_operator(self) -> str:
        return self._op


class FakeParser:
    """Reads the graph (not its weights); each node whose operator is in STATE.unsupported_ops is an
    error, reported as TensorRT does: parse_from_file returns False, get_error(i) says why."""

    def __init__(self, network: FakeNetwork, logger: Logger) -> None:
        self.network, self.errors = network, []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> FakeParserError:
        return self.errors[index]

    def clear_errors(self) -> None:
        self.errors = []

    def parse_from_file(self, path: str) -> bool:
        import onnx

        self.network.onnx = path
        if not Path(path).is_file():
            self.errors.append(FakeParserError(f"Failed to open file: {path}"))
            return False
        graph = onnx.load(path, load_external_data=False).graph
        self.errors += [FakeParserError(f"No importer registered for op: {n.op_type}", n.name, n.op_type)
                        for n in graph.node if n.op_type in STATE.unsupported_ops]
        return not self.errors


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, list] = {}

    def set_shape(self, name: str, lo, opt, hi) -> None:
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = bytes(data) + b"+"

    def serialize(self) -> bytes:
        return self.data


class FakeConfig:
    def __init__(self) -> None:
        self.flags, self.profiles, self.pool, self.cache = {"TF32"}, [], {}, None

    def set_memory_pool_limit(self, pool, size: int) -> None:
        self.pool[pool] = size

    def set_flag(self, flag) -> None:
        self.flags.add(flag.name)

    def clear_flag(self, flag) -> None:
        self.flags.discard(flag.name)

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        return FakeTimingCache(data)

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self) -> FakeTimingCache:
        return self.cache


class Builder:
    def __init__(self, logger: Logger) -> None:
        pass

    def create_network(self, flags: int = 0) -> FakeNetwork:
        return FakeNetwork(flags)

    def create_builder_config(self) -> FakeConfig:
        return FakeConfig()

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()

    def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> bytes:
        plan = {"onnx": network.onnx, "flags": network.flags, "builder_flags": sorted(config.flags),
                "profiles": [p.shapes for p in config.profiles], "workspace": config.pool.get(MemoryPoolType.WORKSPACE)}
        return json.dumps(plan).encode()


class FakeEngine:
    """TensorRT 10.0's engine API (device_memory_size); FakeEngineV2 adds 10.1's _v2 names."""

    memory = 4096  # activation bytes a context needs

    def __init__(self, plan: dict) -> None:
        import onnxruntime as ort

        self.plan = plan
        self.session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
        self.io = {i.name: (TensorIOMode.INPUT, *ORT_TYPES[i.type]) for i in self.session.get_inputs()}
        self.io |= {o.name: (TensorIOMode.OUTPUT, *ORT_TYPES[o.type]) for o in self.session.get_outputs()}
        self.dims = {t.name: list(t.shape) for t in [*self.session.get_inputs(), *self.session.get_outputs()]}
        self.names = list(self.io)
        self.num_io_tensors = len(self.names)
        self.num_optimization_profiles = len(plan["profiles"])

    @property
    def device_memory_size(self) -> int:
        return self.memory

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str):
        return self.io[name][0]

    def get_tensor_dtype(self, name: str):
        return self.io[name][1]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        return [tuple(d) for d in self.plan["profiles"][profile_index][name]]

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC) -> FakeContext | None:
        mine = sum(c.engine is self for c in STATE.contexts)
        if STATE.max_contexts is not None and mine >= STATE.max_contexts:
            STATE.log.append("createExecutionContext: out of memory")  # TensorRT logs it and returns None
            return None
        ctx = (FakeContextV2 if isinstance(self, FakeEngineV2) else FakeContext)(self, strategy)
        STATE.contexts.append(ctx)
        return ctx


class FakeEngineV2(FakeEngine):
    @property
    def device_memory_size_v2(self) -> int:
        return self.memory


class FakeContext:
    """Shapes checked against the active profile; inputs read from and outputs written to the bound
    addresses. `version` counts every state change: a graph captured at one version may only
    replay at that version (TensorRT: modifying a captured context is undefined behaviour)."""

    def __init__(self, engine: FakeEngine, strategy) -> None:
        self.engine, self.strategy = engine, strategy
        self.profile, self.shapes, self.addresses = 0, {}, {}
        self.memory: tuple[int, int] | None = None
        self.profile_stream: int | None = None
        self.switches: list[int] = []
        self.streams: set[int] = set()
        self.version = 0
        self.executions = 0
        self.plain_version: int | None = None  # the state of the last uncaptured enqueue

    @property
    def device_memory(self) -> None:
        raise AttributeError("device_memory is write-only")

    @device_memory.setter
    def device_memory(self, ptr: int) -> None:
        self.version += 1
        self.memory = (ptr, self.engine.memory)

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.version += 1
        if not 0 <= index < self.engine.num_optimization_profiles:
            raise RuntimeError("Error in set optimization profile async.")  # what the Python binding does
        self.profile = index
        self.profile_stream = stream
        self.switches.append(index)
        self.shapes.clear()  # TensorRT forgets the input shapes on a profile switch
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.version += 1
        lo, _, hi = self.engine.plan["profiles"][self.profile][name]
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        """Inputs: as set. Outputs: inferred from the graph's named axes (B, T, K, S)."""
        if name in self.shapes:
            return self.shapes[name]
        sym = {}
        for inp, shape in self.shapes.items():
            for d, v in zip(self.engine.dims[inp], shape, strict=True):
                if isinstance(d, str):
                    sym[d] = v
        return tuple(d if isinstance(d, int) else sym.get(d, -1) for d in self.engine.dims[name])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.version += 1
        if name not in self.engine.io:
            return False
        if "align" in STATE.rules and ptr % ALIGN:
            return STATE.refuse(f"{name}: address {ptr:#x} is not {ALIGN}-byte aligned")  # the old address stays
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        if "stream" in STATE.rules:
            if stream == 0:
                return STATE.refuse("enqueue on stream 0 (the legacy default stream)")
            if self.profile_stream is not None and stream != self.profile_stream:
                return STATE.refuse("enqueue on another stream than the profile switch, without synchronisation")
        self.streams.add(stream)
        if self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED and self.memory is None:
            return STATE.refuse("user-managed context without device memory")
        if self.memory is not None and (self.memory[0] % ALIGN or self.memory[1] < self.engine.memory):
            return STATE.refuse("device memory unaligned or too small")
        missing = [n for n in self.engine.io if n not in self.addresses or
                   (self.engine.io[n][0] == TensorIOMode.INPUT and n not in self.shapes)]
        if missing:
            return STATE.refuse(f"no shape or address for {missing[:3]}")
        too_small = self.buffer_problem()
        if too_small:
            return STATE.refuse(too_small)
        if STATE.capturing is not None and "warm" in STATE.rules and self.plain_version != self.version:
            return STATE.refuse("capture before an uncaptured enqueue of this context in its current state "
                                "(TensorRT needs one execute_async_v3 first)")
        state = (dict(self.shapes), dict(self.addresses))
        if STATE.capturing is not None:  # recorded, not run: a graph replays it later
            STATE.capturing.append((self, self.version, state))
            return True
        self.run(*state)
        self.plain_version = self.version
        return True

    def buffer_problem(self) -> str | None:
        """Rules "inputs" and "outputs": each tensor's bytes at this shape fit its buffer."""
        for name, (mode, _, dt) in self.engine.io.items():
            kind = "input" if mode == TensorIOMode.INPUT else "output"
            if f"{kind}s" not in STATE.rules:
                continue
            need, room = STATE.room(self.addresses[name], self.get_tensor_shape(name), dt)
            if room is None or room < need:
                return f"{kind} {name} needs {need} bytes; its buffer has {room}"
        return None

    def run(self, shapes: dict, addresses: dict) -> None:
        io, sess = self.engine.io, self.engine.session
        feeds = {i.name: at_address(addresses[i.name], shapes[i.name], io[i.name][2]).copy() for i in sess.get_inputs()}
        for out, value in zip(sess.get_outputs(), sess.run(None, feeds), strict=True):
            at_address(addresses[out.name], value.shape, io[out.name][2])[...] = value
        self.executions += 1


class FakeContextV2(FakeContext):
    def set_device_memory(self, ptr: int, size: int) -> None:
        self.version += 1
        self.memory = (ptr, size)


class Runtime:
    def __init__(self, logger: Logger) -> None:
        pass

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
        """None for bytes that are not a plan: TensorRT logs the reason and returns None, never raises."""
        try:
            plan = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            STATE.log.append("IRuntime::deserializeCudaEngine: Error Code 1: Serialization (magic tag does not match)")
            return None
        return (FakeEngine if STATE.api == "10.0" else FakeEngineV2)(plan)


class OnnxParser(FakeParser):
    pass


class FakeTrtGraph:
    """What a CUDA graph of execute_async_v3 is: the kernels of that enqueue with the context state
    baked in. Replaying after the context changed is refused (rule "replay")."""

    def __init__(self, records: list) -> None:
        self.records = records

    def replay(self) -> None:
        for ctx, version, state in self.records:
            if "replay" in STATE.rules and ctx.version != version:
                raise RuntimeError(
                    f"replay of a graph captured at context state {version}, now {ctx.version}: "
                    "the context was modified after capture (undefined behaviour in TensorRT)"
                )
            ctx.run(*state)


class FakeTrtCapturer:
    """GraphRunner's capturer for the fake: a capture records the enqueues instead of running them."""

    def __init__(self) -> None:
        self.log: list[str] = []

    def warmup(self, fn: Callable[[], Any]) -> Any:
        self.log.append("warmup")
        return fn()

    def capture(self, fn: Callable[[], Any]) -> tuple[FakeTrtGraph, Any]:
        self.log.append("capture")
        STATE.capturing = []
        try:
            out = fn()
            graph = FakeTrtGraph(STATE.capturing)
        finally:
            STATE.capturing = None
        return graph, out


@pytest.fixture
def fake_trt(monkeypatch):
    mod = types.ModuleType("tensorrt")
    mod.__version__ = ORIN[0]
    for obj in (Logger, Builder, Runtime, OnnxParser, DataType, TensorIOMode, ExecutionContextAllocationStrategy,
                NetworkDefinitionCreationFlag, BuilderFlag, MemoryPoolType):
        setattr(mod, obj.__name__, obj)
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    machine = list(ORIN)
    monkeypatch.setattr(trt_backend, "machine_info", lambda trt: tuple(machine))
    monkeypatch.setattr(trt_plans, "machine_info", lambda trt: tuple(machine))
    monkeypatch.setattr(build_trt, "machine_info", lambda trt: tuple(machine))
    STATE.__init__()
    for factory in ("zeros", "empty"):  # record torch allocations: the fake checks buffer sizes
        real = getattr(torch, factory)

        def recording(*args, _real=real, **kwargs):
            t = _real(*args, **kwargs)
            STATE.record(t)
            return t

        monkeypatch.setattr(torch, factory, recording)
    real_aligned = trt_backend.aligned_zeros

    def aligned(*args, **kwargs):  # the runner's step buffers: each with its exact size
        t = real_aligned(*args, **kwargs)
        STATE.record_buffer(t)
        return t

    monkeypatch.setattr(trt_backend, "aligned_zeros", aligned)
    yield machine  # tests may change the machine's identity in place
    STATE.__init__()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("tiny_trt"))


@pytest.fixture(scope="module")
def ort_logits(tiny):
    return drive(OrtRunner(tiny[0] / "target" / "model.onnx", SPEC))


def t121(engine) -> list[np.ndarray]:
    """Decode steps T=1, 2, 1 with a prefill between them and one bucket growth (the sequence that
    replays a graph after another key, and another profile, used the same context)."""
    rng = np.random.default_rng(2)
    seq = Row(engine)
    out = []

    def fwd(t: int) -> None:
        out.append(seq.forward(rng.integers(0, 300, t), logits_rows=range(min(t, 4))).copy())
        seq.commit_chain(t)

    fwd(20)  # prefill
    for t in (1, 1, 1, 2, 2, 2, 1, 1):  # T=1 captured on its 2nd use, replayed after T=2 ran
        fwd(t)
    fwd(12)  # a prefill between decodes (T=12 > max_decode_tokens=4)
    for t in (1, 2, 1):
        fwd(t)
    assert engine.reserve(200) == 256  # bucket growth: a new key per width
    for t in (1, 1, 1, 2, 1, 1):
        fwd(t)
    return out


@pytest.fixture(scope="module")
def ort_t121(tiny):
    return t121(OrtRunner(tiny[0] / "target" / "model.onnx", SPEC))


def build(folder: Path, **kw) -> dict:
    args = {"precision": "fp32", "max_seq_len": 300, "max_decode_tokens": 4, "max_prefill_tokens": 64} | kw
    return build_plans(folder, **args)["target"]


def runner(folder: Path, **kw) -> TrtRunner:
    kw.setdefault("capturer", FakeTrtCapturer())
    return TrtRunner.from_folder(folder, Manifest.load(folder), "target", device="cpu", **kw)


def test_build_then_run_with_fake_tensorrt(fake_trt, tiny, ort_logits, ort_t121) -> None:
    folder, _ = tiny
    entry = build(folder, workspace_mb=512)
    manifest = Manifest.load(folder)
    assert manifest.role("target").plans == [entry]
    assert entry["tensorrt_version"] == "10.3.0" and entry["gpu_name"] == "Orin" and entry["compute_capability"] == "8.7"
    assert entry["strongly_typed"] and entry["flags"]["cleared"] == ["TF32"]
    assert [p["name"] for p in entry["profiles"]] == ["prefill", "decode"]
    built = json.loads((folder / "target" / "model.plan").read_bytes())
    assert built["flags"] == 2 and "TF32" not in built["builder_flags"] and built["workspace"] == 512 << 20
    assert built["profiles"] == [p["shapes"] for p in entry["profiles"]]
    assert Path(entry["timing_cache"]).read_bytes() == b"+"
    assert not list(folder.glob("target/.model.plan*"))  # the temp file was renamed away

    build(folder)
    manifest = Manifest.load(folder)
    assert len(manifest.role("target").plans) == 1  # a rebuild replaces the entry of the overwritten file
    assert Path(entry["timing_cache"]).read_bytes() == b"++"  # the timing cache was loaded and saved again
    assert usable_plans(manifest) == {"target": manifest.role("target").plans[0]}

    engine = runner(folder)  # every rule of the strict fake on
    assert engine.bucket == 128 and engine.spec.max_seq_len == 300
    assert_same_logits(drive(engine), ort_logits)
    engine.reset()
    assert_same_logits(t121(engine), ort_t121)
    stats = engine.graph_stats
    assert stats["graph_replays"] > 0 and stats["capture_failures"] == 0 and stats["graphs_captured"] >= 3
    assert STATE.refusals == []
    contexts = [c for c in STATE.contexts if c.engine is engine.cuda_engine]
    # one context per graph key, plus one shared by the uncaptured prefills (every decode width here had a key)
    assert engine.contexts_created == len(contexts) == len(engine.runner._slots) + 1
    for c in contexts:  # each context chose its profile once, on the runner's own stream, and ran there only
        assert c.strategy == ExecutionContextAllocationStrategy.USER_MANAGED and c.memory[0] == contexts[0].memory[0]
        assert len(c.switches) == 1 and c.streams <= {engine.stream.cuda_stream} and engine.stream.cuda_stream != 0
    assert sorted(c.switches[0] for c in contexts).count(0) == 1  # the prefill context; every other one is decode

    engine.reset()
    with pytest.raises(MtadError, match="outside the plan's prefill profile.*mtad-trt build"):
        Row(engine).forward(list(range(100)))  # T=100 > max_prefill_tokens=64

    fake_trt[:] = H100  # the folder moved to another machine
    assert usable_plans(manifest) is None
    with pytest.raises(EngineFolderError, match=f"rebuild it here with `mtad-trt build {folder} --precision fp32"):
        TrtRunner.from_folder(folder, manifest, "target", device="cpu")


# One test per rule, with only that rule on: each fails on the runner as it was before issue 15.
def test_rule_replay_needs_a_context_per_graph(fake_trt, tiny, ort_t121) -> None:
    """Issue 15 item 1: T=1, 2, 1 with a prefill between must not replay a graph on a rebound context."""
    STATE.rules = {"replay"}
    build(tiny[0])
    engine = runner(tiny[0])
    assert_same_logits(t121(engine), ort_t121)
    assert engine.graph_stats["graph_replays"] >= 5


def test_rule_no_default_stream(fake_trt, tiny, ort_t121) -> None:
    """Item 2: every enqueue (and profile switch) on the runner's own stream, never stream 0."""
    STATE.rules = {"stream"}
    build(tiny[0])
    engine = runner(tiny[0])
    assert_same_logits(t121(engine), ort_t121)
    assert STATE.refusals == []


def test_rule_aligned_addresses(fake_trt, tiny, ort_t121) -> None:
    """Item 3: an odd capacity (299 slots) puts a naive layout's KV rows 128 bytes off 256."""
    STATE.rules = {"align"}
    build(tiny[0], max_seq_len=299)
    engine = runner(tiny[0])
    assert SPEC.num_kv_heads * 299 * SPEC.head_dim * 4 % ALIGN == 128  # a naive layout's row stride
    assert_same_logits(t121(engine), ort_t121)
    assert STATE.refusals == []
    engine.cache.views[1] = engine.cache.flat[1][16:16 + engine.cache.views[1].numel()].view(engine.cache.views[1].shape)
    engine.runner.clear()  # new keys bind again: the runner checks each address itself, with a clear message
    with pytest.raises(MtadError, match="past_key_values.0.value is at address .* not 256-byte aligned"):
        Row(engine).forward([1])


def test_graphs_off_share_one_context_per_profile(fake_trt, tiny, ort_t121) -> None:
    build(tiny[0])
    engine = runner(tiny[0], capturer=None)
    assert_same_logits(t121(engine), ort_t121)
    assert engine.contexts_created == 2 and engine.graph_stats["graphs_captured"] == 0
    assert sorted(c.switches for c in STATE.contexts) == [[0], [1]]  # rebound per step, never switched


def drifted_runner(folder: Path) -> TrtRunner:
    """A runner whose manifest says vocab 296 where the plan's graph gives 300 (item 4)."""
    entry = build(folder)
    return TrtRunner(folder / entry["path"], replace(SPEC, vocab_size=296), entry, device="cpu",
                     capturer=FakeTrtCapturer())


def test_rule_output_shapes_match_buffers(fake_trt, tiny, monkeypatch) -> None:
    """Item 4, the fake's rule: with the runner's own shape check bypassed, TensorRT (the fake) is
    asked to write 300 logits into a 296-logit buffer and refuses, so nothing is written."""
    STATE.rules = {"outputs"}
    engine = drifted_runner(tiny[0])
    monkeypatch.setattr(TrtRunner, "_check_output_shapes", lambda self, ctx, outputs: None)
    with pytest.raises(MtadError, match="execute_async_v3 failed"):
        Row(engine).forward([1, 2, 3])
    assert STATE.refusals == [f"output logits needs {300 * 4} bytes; its buffer has {296 * 4}"]
    assert all(c.executions == 0 for c in STATE.contexts)


def test_runner_refuses_outputs_that_drifted_from_the_manifest(fake_trt, tiny) -> None:
    """Item 4, the runner's own check: it compares the shapes TensorRT infers with its buffers
    before binding, and says what to do, before the fake's rule could refuse."""
    engine = drifted_runner(tiny[0])
    with pytest.raises(EngineFolderError, match=r"plan output logits has shape \(1, 1, 300\) .* gives \(1, 1, 296\)"):
        Row(engine).forward([1, 2, 3])
    assert STATE.refusals == []


def test_rule_input_buffers_hold_their_shapes(fake_trt, tiny, ort_t121) -> None:
    """Every input's shape is its buffer's (the KV cache: the first B rows of each layer's view)."""
    STATE.rules = {"inputs"}
    build(tiny[0])
    engine = runner(tiny[0])
    assert_same_logits(t121(engine), ort_t121)
    assert STATE.refusals == []


def test_runner_refuses_a_strided_input(fake_trt, tiny) -> None:
    """TensorRT reads dense memory at an address: a strided view would be read as other elements."""
    build(tiny[0])
    engine = runner(tiny[0])
    Row(engine).forward([1])
    view = engine.cache.views[1]
    engine.cache.views[1] = engine.cache.flat[1][:2 * view.numel()].view(*view.shape[:-1], -1)[..., ::2]
    assert engine.cache.views[1].shape == view.shape and engine.cache.views[1].data_ptr() == view.data_ptr()
    engine.runner.clear()
    with pytest.raises(MtadError, match=r"past_key_values.0.value is not contiguous"):
        Row(engine).forward([1])


def test_rule_capture_after_an_uncaptured_enqueue(fake_trt, tiny, ort_t121) -> None:
    """Each graph key's context runs once uncaptured (the runner's warm-up) before its capture."""
    STATE.rules = {"warm"}
    build(tiny[0])
    engine = runner(tiny[0])
    assert_same_logits(t121(engine), ort_t121)
    assert STATE.refusals == [] and engine.graph_stats["capture_failures"] == 0
    assert engine.graph_stats["graphs_captured"] >= 3


class CapturesWithoutWarmup(FakeTrtCapturer):
    """A runner that skipped the plain run: its "warm-up" is recorded, never executed."""

    def warmup(self, fn: Callable[[], Any]) -> Any:
        return self.capture(fn)[1]


def test_rule_capture_after_an_uncaptured_enqueue_can_fail(fake_trt, tiny) -> None:
    STATE.rules = {"warm"}
    build(tiny[0])
    engine = runner(tiny[0], capturer=CapturesWithoutWarmup())
    row = Row(engine)
    row.forward(list(range(8)))  # T=8 > max_decode_tokens: prefill, never captured
    row.commit_chain(8)
    with pytest.raises(MtadError, match="execute_async_v3 failed"):
        row.forward([1])
    assert "capture before an uncaptured enqueue" in STATE.refusals[-1]


def test_parse_errors_name_the_nodes(fake_trt, tiny) -> None:
    """TensorRT's parser reports by return value and get_error(i): the build names node and operator."""
    folder = tiny[0]
    manifest = (folder / "manifest.json").read_text()
    STATE.unsupported_ops = {"Softmax"}
    with pytest.raises(MtadError, match=r"could not parse .*model\.onnx: node_\w+ \(Softmax\): No importer "
                                        r"registered for op: Softmax; node_\w+ \(Softmax\): [^;]*$"):
        build(folder)
    STATE.unsupported_ops = {"Mul"}  # many nodes: the first five, and how many more
    with pytest.raises(MtadError, match=r": (node_\w+ \(Mul\): [^;]*; ){4}node_\w+ \(Mul\): [^;]* \(and \d+ more\)$"):
        build(folder)
    assert (folder / "manifest.json").read_text() == manifest and not list(folder.glob("target/.model.plan*"))


def test_a_plan_tensorrt_cannot_load_is_a_clear_refusal(fake_trt, tiny) -> None:
    """deserialize_cuda_engine returns None (a corrupt or foreign plan): the plan and the rebuild are named."""
    folder = tiny[0]
    build(folder)
    plan = folder / "target" / "model.plan"
    good = plan.read_bytes()
    plan.write_bytes(b"\x00\x01 not a plan")
    try:
        with pytest.raises(EngineFolderError, match=f"could not load the plan {re.escape(str(plan))} .*rebuild it "
                                                    f"with `mtad-trt build {re.escape(str(folder))} --precision fp32"):
            runner(folder)
    finally:
        plan.write_bytes(good)
    assert "Serialization" in STATE.log[-1]


def test_no_execution_context_is_a_clear_refusal(fake_trt, tiny) -> None:
    """create_execution_context returns None (GPU memory): the plan, the cause and the fixes are named."""
    build(tiny[0])
    STATE.max_contexts = 1
    engine = runner(tiny[0])
    row = Row(engine)
    row.forward(list(range(8)))  # the prefill context
    row.commit_chain(8)
    with pytest.raises(BackendUnavailable, match=r"could not create execution context 2 of the plan .*model\.plan "
                                                 r".*out of memory.*`mtad-trt build .* --precision fp32"):
        row.forward([1])  # a decode key: a context of its own
    assert STATE.log == ["createExecutionContext: out of memory"]


def test_manifest_profiles_must_match_the_plan(fake_trt, tiny) -> None:
    """Item 5: the plan's own profiles (count, order, min/opt/max) are compared with the manifest's."""
    folder, _ = tiny
    build(folder)
    good = Manifest.load(folder)
    runner(folder).close()

    def refused(edit: Callable[[list], None], why: str) -> None:
        manifest = Manifest.load(folder)
        edit(manifest.role("target").plans[-1]["profiles"])
        with pytest.raises(EngineFolderError, match=f"{why}.*rebuild it with `mtad-trt build {folder} --precision fp32"):
            TrtRunner.from_folder(folder, manifest, "target", device="cpu")

    refused(lambda p: p.reverse(), r"profile 0 \(decode\) input_ids: plan \[min, opt, max\] \[\[1, 1\], \[1, 64\]")
    refused(lambda p: p.pop(), "the manifest lists no 'decode' profile.*plan has 2 optimization profiles")
    refused(lambda p: p[1]["shapes"]["input_ids"][2].__setitem__(1, 8), r"profile 1 \(decode\) input_ids")
    assert good.role("target").plans[-1]["profiles"][1]["shapes"]["input_ids"][2] == [1, 4]


def test_device_memory_api_of_tensorrt_10_0(fake_trt, tiny, ort_logits) -> None:
    """10.0 has `device_memory_size` and the `device_memory` property; 10.1+ the _v2 size and set_device_memory."""
    STATE.api = "10.0"
    build(tiny[0])
    engine = runner(tiny[0])
    assert not hasattr(engine.cuda_engine, "device_memory_size_v2")
    assert_same_logits(drive(engine), ort_logits)
    assert all(c.memory is not None for c in STATE.contexts)


def bind_all(ctx: FakeContext, ptr: int) -> None:
    """Every input at its profile's max shape and every tensor at `ptr`."""
    for name in ctx.engine.io:
        if ctx.engine.io[name][0] == TensorIOMode.INPUT:
            assert ctx.set_input_shape(name, ctx.engine.plan["profiles"][ctx.profile][name][2])
        assert ctx.set_tensor_address(name, ptr)


def test_the_strict_fake_can_fail(fake_trt, tiny) -> None:
    """Negative controls: each rule refuses what it should when used directly."""
    entry = build(tiny[0])
    engine = Runtime(Logger()).deserialize_cuda_engine((tiny[0] / entry["path"]).read_bytes())
    ctx = engine.create_execution_context(ExecutionContextAllocationStrategy.USER_MANAGED)
    buf = torch.zeros(1024, dtype=torch.uint8)
    base = buf.data_ptr() + (-buf.data_ptr() % ALIGN)
    assert ctx.set_tensor_address("logits", base) and not ctx.set_tensor_address("logits", base + 64)
    assert ctx.addresses["logits"] == base  # a refused address leaves the old one
    assert not ctx.execute_async_v3(0) and "stream 0" in STATE.refusals[-1]
    assert not ctx.execute_async_v3(7) and "without device memory" in STATE.refusals[-1]
    ctx.set_device_memory(base, 4096)
    assert not ctx.execute_async_v3(7) and "no shape or address" in STATE.refusals[-1]
    bind_all(ctx, base)  # every tensor at one 1024-byte buffer: shapes that need more
    assert not ctx.execute_async_v3(7)  # input_ids, position_ids (64 int64s) fit; the [1, 1, 64, 364] mask does not
    assert STATE.refusals[-1] == f"input attention_mask needs {64 * 364} bytes; its buffer has {1024 - (base - buf.data_ptr())}"
    STATE.rules, STATE.capturing = {"warm"}, []  # buffers unchecked: a capture is refused for want of a plain run
    assert not ctx.execute_async_v3(7) and "before an uncaptured enqueue" in STATE.refusals[-1]
    STATE.rules = set(RULES)
    STATE.capturing = [(ctx, ctx.version, ({}, {}))]
    graph = FakeTrtGraph(STATE.capturing)
    STATE.capturing = None
    ctx.set_input_shape("input_ids", (1, 1))
    with pytest.raises(RuntimeError, match="modified after capture"):
        graph.replay()
    assert STATE.extent(base) == 1024 - (base - buf.data_ptr()) and STATE.extent(12345) is None


def test_no_plan_says_how_to_build(fake_trt, tmp_path) -> None:
    manifest = Manifest(roles={"target": RoleEntry(spec=SPEC, onnx="target/model.onnx")})
    with pytest.raises(EngineFolderError, match=f"no TensorRT plan for the target model: build one with `mtad-trt build {tmp_path}`"):
        TrtRunner.from_folder(tmp_path, manifest, "target", device="cpu")
    assert usable_plans(manifest) is None
    manifest.role("target").plans = [plan_entry()]  # listed, but the file is gone
    with pytest.raises(EngineFolderError, match="missing TensorRT plan .*mtad-trt build"):
        TrtRunner.from_folder(tmp_path, manifest, "target", device="cpu")


def test_build_refuses_before_building(fake_trt, tiny) -> None:
    folder, _ = tiny
    fake_trt[0] = "11.1.0"
    with pytest.raises(MtadError, match="strongly typed networks only"):
        build_plans(folder, precision="fp16")


# -- real TensorRT, on a GPU machine (scripts/gpu_check.sh runs these) -------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_tensorrt_matches_ort_and_graphs_match_eager(tiny, ort_logits, ort_t121, tmp_path) -> None:
    import shutil

    try:
        import_tensorrt()
    except BackendUnavailable as e:
        pytest.skip(str(e))
    folder = tmp_path / "engine"
    shutil.copytree(tiny[0], folder)
    manifest = Manifest.load(folder)
    manifest.role("target").plans = []  # entries the fake may have written
    manifest.save(folder)
    build_plans(folder, precision="fp32", max_seq_len=300, max_decode_tokens=4, max_prefill_tokens=64)
    manifest = Manifest.load(folder)
    eager = TrtRunner.from_folder(folder, manifest, "target", cuda_graphs=False)
    graphed = TrtRunner.from_folder(folder, manifest, "target")
    want = drive(eager)
    eager.reset()
    want_t121 = t121(eager)
    assert_same_logits(want, ort_logits, tol=1e-3)
    assert_same_logits(want_t121, ort_t121, tol=1e-3)
    got = drive(graphed)
    graphed.reset()
    assert_same_logits(got + t121(graphed), want + want_t121, tol=1e-4)
    stats = graphed.graph_stats
    assert stats["capture_failures"] == 0 and stats["graph_replays"] > 10, stats
    assert graphed.stream.cuda_stream != 0 and eager.contexts_created == 2


def test_gpu_check_trt_phase_runs_with_fake_tensorrt(fake_trt, tmp_path) -> None:
    """scripts/gpu_check.py's TensorRT phase (export, build, three comparisons, step times) end to
    end on CPU, so the first GPU run does not stop on plumbing."""
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import gpu_check

    check = gpu_check.Check(tmp_path, budget_s=600)
    args = argparse.Namespace(device="cpu", trt_layers=0, decode_opt_tokens=1, repeat=2)
    out = gpu_check.phase_trt(check, args, "draft", tmp_path)
    assert check.data["failures"] == [] and STATE.refusals == []
    assert out["full_depth"] and out["dtype"] == "float16" and out["decode_opt_tokens"] == 1
    assert out["eager_vs_ort_cpu"]["rel_diff"] < 1e-3 and out["eager_vs_ort_cpu"]["steps"] == 19
    assert out["graphs_vs_eager"]["max_abs_diff"] == 0 and out["contexts"] == 2
    # the batched rows too: four rows of different lengths against ONNX Runtime with four rows
    assert out["eager_vs_ort_cpu_rows4"]["rel_diff"] < 1e-3 and out["eager_vs_ort_cpu_rows4"]["steps"] == 10
    assert out["graphs_vs_eager_rows4"]["max_abs_diff"] == 0 and "graph_stats_rows4" in out  # no graphs on CPU
    assert set(out["steps"]["graphs_on"]) >= {"1x1", "1x17", "4x5"}
    timed = out["steps"]["graphs_vs_eager"]  # every timed step, graphs on against graphs off
    assert set(timed) == {"1x1", "1x4", "1x5", "1x17", "4x1", "4x5"} and all(p["max_abs_diff"] == 0 for p in timed.values())
