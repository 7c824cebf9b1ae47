"""TensorRT backend and plan building, without TensorRT or a GPU.

The pure parts (profiles, flag choice, refusals, plan compatibility) are tested directly. The
orchestration (`build_plans`, `TrtRunner`) runs against a fake `tensorrt` module that mirrors
the documented TensorRT 10 Python API and executes the plan with ONNX Runtime: its execution
context reads and writes the tensor addresses the engine binds, so the engine's binding, profile
switching, KV cache and graph path are checked for parity with the ONNX Runtime backend. What
this cannot show is that real TensorRT accepts the graph and the calls; see docs/gpu.md.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from test_cuda_graphs import FakeCapturer
from test_torch_backend import SPEC, assert_same_logits, build_tiny_engine, drive

import mtad_trt.backends.trt as trt_backend
import mtad_trt.backends.trt_plans as trt_plans
import mtad_trt.export.build_trt as build_trt
from mtad_trt.backends.ort import OrtRunner
from mtad_trt.backends.trt import TrtRunner
from mtad_trt.backends.trt_plans import check_plan_compat, import_tensorrt, select_plan, usable_plans
from mtad_trt.contract import ModelSpec
from mtad_trt.errors import BackendUnavailable, EngineFolderError, MtadError
from mtad_trt.export.build_trt import build_plans, choose_flags, plan_profiles, plan_role
from mtad_trt.manifest import Manifest, RoleEntry
from mtad_trt.rows import Row

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


# -- a fake TensorRT backed by ONNX Runtime ---------------------------------------------------
DataType = enum.Enum("DataType", "FLOAT HALF BF16 INT32 INT64 BOOL INT8 UINT8")
TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})
BuilderFlag = enum.IntEnum("BuilderFlag", "FP16 BF16 TF32")
MemoryPoolType = enum.IntEnum("MemoryPoolType", "WORKSPACE")
ORT_TYPES = {"tensor(float)": (DataType.FLOAT, np.float32), "tensor(float16)": (DataType.HALF, np.float16),
             "tensor(int64)": (DataType.INT64, np.int64), "tensor(bool)": (DataType.BOOL, np.bool_)}


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


class FakeParser:
    def __init__(self, network: FakeNetwork, logger: Logger) -> None:
        self.network, self.num_errors = network, 0

    def parse_from_file(self, path: str) -> bool:
        self.network.onnx = path
        return Path(path).is_file()


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
    def __init__(self, plan: dict) -> None:
        import onnxruntime as ort

        self.plan = plan
        self.session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
        self.io = {i.name: (TensorIOMode.INPUT, *ORT_TYPES[i.type]) for i in self.session.get_inputs()}
        self.io |= {o.name: (TensorIOMode.OUTPUT, *ORT_TYPES[o.type]) for o in self.session.get_outputs()}
        self.names = list(self.io)
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str):
        return self.io[name][0]

    def get_tensor_dtype(self, name: str):
        return self.io[name][1]

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self)


class FakeContext:
    """Checks shapes against the active profile, reads inputs from and writes outputs to the bound addresses."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}
        self.switches: list[int] = []
        self.executions = 0

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profile = index
        self.switches.append(index)
        self.shapes.clear()  # TensorRT forgets the input shapes on a profile switch
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        lo, _, hi = self.engine.plan["profiles"][self.profile][name]
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        io, sess = self.engine.io, self.engine.session
        feeds = {i.name: at_address(self.addresses[i.name], self.shapes[i.name], io[i.name][2]).copy() for i in sess.get_inputs()}
        for out, value in zip(sess.get_outputs(), sess.run(None, feeds), strict=True):
            at_address(self.addresses[out.name], value.shape, io[out.name][2])[...] = value
        self.executions += 1
        return True


class Runtime:
    def __init__(self, logger: Logger) -> None:
        pass

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine:
        return FakeEngine(json.loads(data))


class OnnxParser(FakeParser):
    pass


@pytest.fixture
def fake_trt(monkeypatch):
    mod = types.ModuleType("tensorrt")
    mod.__version__ = ORIN[0]
    for obj in (Logger, Builder, Runtime, OnnxParser, DataType, TensorIOMode, NetworkDefinitionCreationFlag, BuilderFlag, MemoryPoolType):
        setattr(mod, obj.__name__, obj)
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    machine = list(ORIN)
    monkeypatch.setattr(trt_backend, "machine_info", lambda trt: tuple(machine))
    monkeypatch.setattr(trt_plans, "machine_info", lambda trt: tuple(machine))
    monkeypatch.setattr(build_trt, "machine_info", lambda trt: tuple(machine))
    return machine  # tests may change the machine's identity in place


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("tiny_trt"))


@pytest.fixture(scope="module")
def ort_logits(tiny):
    return drive(OrtRunner(tiny[0] / "target" / "model.onnx", SPEC))


def test_build_then_run_with_fake_tensorrt(fake_trt, tiny, ort_logits) -> None:
    folder, _ = tiny
    entries = build_plans(folder, precision="fp32", max_seq_len=300, max_decode_tokens=4, max_prefill_tokens=64, workspace_mb=512)
    entry = entries["target"]
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

    build_plans(folder, precision="fp32", max_seq_len=300, max_decode_tokens=4, max_prefill_tokens=64)
    manifest = Manifest.load(folder)
    assert len(manifest.role("target").plans) == 1  # a rebuild replaces the entry of the overwritten file
    assert Path(entry["timing_cache"]).read_bytes() == b"++"  # the timing cache was loaded and saved again
    assert usable_plans(manifest) == {"target": manifest.role("target").plans[0]}

    engine = TrtRunner.from_folder(folder, manifest, "target", device="cpu", capturer=FakeCapturer())
    assert engine.bucket == 128 and engine.spec.max_seq_len == 300
    assert_same_logits(drive(engine), ort_logits)
    assert engine.context.switches[:2] == [0, 1]  # prefill profile, then decode/verify
    assert engine.graph_stats["graph_replays"] > 0 and engine.graph_stats["capture_failures"] == 0

    engine.reset()
    with pytest.raises(MtadError, match="outside the plan's prefill profile.*mtad-trt build"):
        Row(engine).forward(list(range(100)))  # T=100 > max_prefill_tokens=64

    fake_trt[:] = H100  # the folder moved to another machine
    assert usable_plans(manifest) is None
    with pytest.raises(EngineFolderError, match=f"rebuild it here with `mtad-trt build {folder} --precision fp32"):
        TrtRunner.from_folder(folder, manifest, "target", device="cpu")


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
