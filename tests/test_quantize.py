"""Weight-only quantized engines for the ONNX Runtime CPU path."""

from __future__ import annotations

import numpy as np
import pytest

from mtad_trt import Pipeline
from mtad_trt.backends.ort import OrtRunner
from mtad_trt.export.pair import export_pair
from mtad_trt.manifest import Manifest
from mtad_trt.rows import Row


@pytest.fixture(scope="module")
def int4_engine(tmp_path_factory, qwen_draft, qwen_target):
    out = tmp_path_factory.mktemp("q") / "int4"
    # block 32: the tiny models' 64-wide matrices are smaller than the default block of 128
    export_pair(str(qwen_draft), str(qwen_target), out, max_seq_len=256, quantize={"draft": "int4", "target": "int8"},
                block_size=32)
    return out


def test_manifest_records_scheme_and_quality(int4_engine):
    m = Manifest.load(int4_engine)
    d, t = m.roles["draft"].quantization, m.roles["target"].quantization
    assert (d["scheme"], d["bits"], t["scheme"], t["bits"], d["block_size"]) == ("int4", 4, "int8", 8, 32)
    for q in (d, t):
        assert q["op"] == "MatMulNBits" and q["quantized_matmuls"] > 0
        assert q["quality"]["ppl_float"] > 0 and q["quality"]["ppl_quantized"] > 0
    assert not (int4_engine / "target" / "float").exists()  # the float reference graph is not kept


def test_quantized_logits_close_to_float(int4_engine, pair_engine):
    """Stated tolerance on random tiny models: int8 moves logits by < 2% of their range and keeps
    >= 90% of argmaxes; int4 (block 32) by < 10% and >= 50% (random weights have many near-ties)."""
    rng = np.random.default_rng(0)
    for role, rel, top1 in (("target", 0.02, 0.9), ("draft", 0.10, 0.5)):
        spec = Manifest.load(pair_engine).roles[role].spec
        f = Row(OrtRunner(pair_engine / f"{role}/model.onnx", spec))
        q = Row(OrtRunner(int4_engine / f"{role}/model.onnx", spec))
        ids = [int(x) for x in rng.integers(0, spec.vocab_size, 20)]
        lf = f.forward(ids, logits_rows=range(20))
        lq = q.forward(ids, logits_rows=range(20))
        span = lf.max() - lf.min()
        assert np.abs(lf - lq).max() < rel * span
        assert (lf.argmax(-1) == lq.argmax(-1)).mean() >= top1


def test_quantized_pair_generates_and_greedy_decoders_agree(int4_engine):
    with Pipeline.load(int4_engine, backend="ort") as pipe:
        ref = pipe.generate("def fib(n):", decoder="ar", temperature=0, max_new_tokens=20, ignore_eos=True)
        for dec in ("sps", "mtad", "mmtad"):
            out = pipe.generate("def fib(n):", decoder=dec, temperature=0, max_new_tokens=20, ignore_eos=True)
            assert out.token_ids == ref.token_ids


def test_tensorrt_build_refuses_quantized_graphs(int4_engine):
    from mtad_trt.errors import MtadError
    from mtad_trt.export.build_trt import build_plans

    with pytest.raises(MtadError, match="int4-quantized.*--quantize none"):
        build_plans(int4_engine)
