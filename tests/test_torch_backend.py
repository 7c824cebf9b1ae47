"""Torch backend: the contract wrapper on CPU matches ONNX Runtime step for step (prefill, decode,
trees, scratch slots, compaction, bucket growth); model loading; CUDA graphs on a GPU.

`build_tiny_engine` and `drive` are also used by tests/test_trt.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from mtad_trt.backends.ort import OrtRunner
from mtad_trt.backends.rows import Row
from mtad_trt.backends.runner import ModelRunner
from mtad_trt.backends.torch_backend import TorchRunner
from mtad_trt.contract import ModelSpec
from mtad_trt.errors import BackendUnavailable, EngineFolderError
from mtad_trt.export.role import export_onnx
from mtad_trt.folder.manifest import Manifest, RoleEntry

TOL = 1e-4
SPEC = ModelSpec(num_layers=2, num_kv_heads=2, head_dim=16, vocab_size=300, dtype="float32", max_seq_len=300, architecture="qwen2")


def build_tiny_engine(root: Path, export: bool = True) -> tuple[Path, Manifest]:
    """A random tiny Qwen2 saved as an HF folder and exported into an engine folder (role: target).

    export=False skips the ONNX export (~5 s) for tests that only run the torch backend.

    initializer_range 0.2 (not 0.02) gives logits of a few units, so a wrong cache row shows up
    far above the parity tolerance.
    """
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    src = root / "hf_source"
    model.save_pretrained(src)
    folder = root / "engine"
    (folder / "target").mkdir(parents=True)
    if export:
        export_onnx(model, SPEC, folder / "target" / "model.onnx")
    source = {"kind": "hf", "path": str(src), "given": str(src)}
    manifest = Manifest(roles={"target": RoleEntry(spec=SPEC, onnx="target/model.onnx", source=source)})
    manifest.save(folder)
    return folder, manifest


def drive(engine: ModelRunner) -> list[np.ndarray]:
    """One scripted sequence through every kind of step; returns a copy of each step's logits."""
    rng = np.random.default_rng(0)
    seq = Row(engine)
    out = []

    def fwd(*args, **kw) -> None:
        out.append(seq.forward(*args, **kw).copy())

    fwd(rng.integers(0, 300, 40))  # prefill
    seq.commit_chain(40)
    for tok in (3, 17, 250):  # single-token decode
        fwd([tok])
        seq.commit_chain(1)
    fwd([5, 6, 7], logits_rows=[0, 1, 2])  # verify chain
    seq.commit_chain(2)
    n = seq.n
    # a 4-node tree (0 -> 1 -> 3, 0 -> 2): siblings share positions; all nodes kept in scratch slots
    fwd([11, 12, 13, 14], parents=[-1, 0, 0, 1], logits_rows=[0, 1, 2, 3], slots=n + 4)
    seq.keep([0, 1, 2, 3], [n, n + 1, n + 2, n + 3])
    # children of node 3, whose ancestors sit in scratch slots n, n+1, n+3
    fwd([21, 22], parents=[-1, -1], logits_rows=[0, 1], cache_ancestors=[[n, n + 1, n + 3], [n, n + 1, n + 3]])
    seq.move([n + 3], [n + 2])  # compaction: accepted path 0 -> 1 -> 3 becomes contiguous
    seq.n = n + 3
    fwd([30])
    seq.commit_chain(1)
    assert engine.bucket == 128
    assert engine.reserve(200) == 256  # bucket growth: cached rows must survive the re-layout
    for tok in (40, 41, 42):
        fwd([tok])
        seq.commit_chain(1)
    assert engine.bucket == 256
    return out


def assert_same_logits(a: list[np.ndarray], b: list[np.ndarray], tol: float = TOL) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.shape == y.shape, (i, x.shape, y.shape)
        diff = float(np.abs(x - y).max())
        assert diff <= tol, f"step {i}: max |diff| {diff}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Manifest]:
    return build_tiny_engine(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def ort_logits(tiny) -> list[np.ndarray]:
    folder, manifest = tiny
    engine = OrtRunner(folder / "target" / "model.onnx", SPEC)
    try:
        return drive(engine)
    finally:
        engine.close()


def test_torch_cpu_matches_ort(tiny, ort_logits) -> None:
    folder, manifest = tiny
    engine = TorchRunner.from_folder(folder, manifest, "target", device="cpu", threads=1)
    assert isinstance(engine, ModelRunner)
    assert engine.name == "torch-cpu"
    logits = drive(engine)
    assert_same_logits(logits, ort_logits)
    # the parity is not vacuous: steps differ by far more than the tolerance
    assert float(np.abs(logits[1][0] - logits[2][0]).max()) > 100 * TOL
    engine.reset()
    assert engine.bucket == 128
    assert_same_logits(drive(engine), ort_logits)  # reset leaves nothing behind
    engine.close()


def test_wrong_cache_is_detected(tiny, ort_logits) -> None:
    """Negative control: dropping one kept row must break parity (so the parity test can fail)."""
    folder, manifest = tiny
    engine = TorchRunner.from_folder(folder, manifest, "target", device="cpu")
    real_keep = engine.keep
    engine.keep = lambda row, src, dst: real_keep(row, src[:-1], dst[:-1]) if len(src) > 3 else real_keep(row, src, dst)
    logits = drive(engine)
    assert max(float(np.abs(x - y).max()) for x, y in zip(logits, ort_logits, strict=True)) > 1e-2


def test_loads_engine_copy_first_and_refuses_missing(tiny, tmp_path) -> None:
    folder, manifest = tiny
    own = tmp_path / "engine"
    shutil.copytree(folder, own)
    shutil.copytree(manifest.role("target").source["path"], own / "target" / "hf")
    gone = Manifest.load(own)
    gone.role("target").source["path"] = str(tmp_path / "nowhere")
    engine = TorchRunner.from_folder(own, gone, "target")  # from <folder>/target/hf
    assert engine.spec.vocab_size == 300
    shutil.rmtree(own / "target" / "hf")
    with pytest.raises(EngineFolderError, match="weights"):
        TorchRunner.from_folder(own, gone, "target")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_cuda_without_gpu_is_refused(tiny) -> None:
    folder, manifest = tiny
    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        TorchRunner.from_folder(folder, manifest, "target", device="cuda")


def test_model_must_match_manifest(tiny) -> None:
    folder, manifest = tiny
    wrong = Manifest.load(folder)
    wrong.role("target").spec.num_layers = 3
    with pytest.raises(EngineFolderError, match="num_layers 2"):
        TorchRunner.from_folder(folder, wrong, "target")


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
def test_cuda_eager_matches_ort(tiny, ort_logits) -> None:
    folder, manifest = tiny
    engine = TorchRunner.from_folder(folder, manifest, "target", device="cuda", cuda_graphs=False)
    assert engine.name == "torch-cuda"
    assert_same_logits(drive(engine), ort_logits, tol=1e-3)
