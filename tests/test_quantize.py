"""Weight-only quantized engines for the ONNX Runtime CPU path."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mtad_trt import Pipeline
from mtad_trt.backends.ort import OrtRunner
from mtad_trt.backends.rows import Row
from mtad_trt.export.pair import export_pair
from mtad_trt.folder.manifest import Manifest


@pytest.fixture(scope="module")
def int4_engine(tmp_path_factory, qwen_draft, qwen_target):
    out = tmp_path_factory.mktemp("q") / "int4"
    # block 32: the tiny models' 64-wide matrices are smaller than the default block of 128
    export_pair(str(qwen_draft), str(qwen_target), out, max_seq_len=256, quantize={"draft": "int4", "target": "int8"},
                block_size=32, embedding="quantized")
    return out


def test_manifest_records_scheme_and_quality(int4_engine):
    m = Manifest.load(int4_engine)
    d, t = m.roles["draft"].quantization, m.roles["target"].quantization
    assert (d["scheme"], d["bits"], t["scheme"], t["bits"], d["block_size"]) == ("int4", 4, "int8", 8, 32)
    assert (d["quantized_matmuls"], t["quantized_matmuls"]) == (8, 15)  # 7 per layer + the LM head (1 and 2 layers)
    assert d["op"] == t["op"] == "MatMulNBits"
    assert not (int4_engine / "target" / "float").exists()  # the float reference graph is not kept


def prose_perplexity(engine, role) -> float:
    """Perplexity of the export's prose sample under one engine's graph: one forward, numpy log-softmax."""
    from transformers import AutoTokenizer

    from mtad_trt.export.role import PROSE, REFERENCE_TOKENS

    spec = Manifest.load(engine).roles[role].spec
    ids = AutoTokenizer.from_pretrained(str(engine / "tokenizer")).encode(PROSE, add_special_tokens=False)
    ids = ids[: min(spec.max_seq_len, REFERENCE_TOKENS)]
    logits = Row(OrtRunner(engine / f"{role}/model.onnx", spec)).forward(ids, logits_rows=range(len(ids) - 1))
    x = logits.astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


def test_manifest_quality_record_is_the_graphs_perplexity(int4_engine, pair_engine):
    # the recorded perplexities: the float reference's (transformers layer by layer) equals the float
    # graph's of the same models (pair_engine); the quantized one is the quantized graph's
    for role in ("draft", "target"):
        quality = Manifest.load(int4_engine).roles[role].quantization["quality"]
        assert quality["ppl_float"] == pytest.approx(prose_perplexity(pair_engine, role), rel=1e-4)
        assert quality["ppl_quantized"] == pytest.approx(prose_perplexity(int4_engine, role), rel=1e-4)
        assert quality["ppl_ratio"] == pytest.approx(quality["ppl_quantized"] / quality["ppl_float"], rel=1e-12)
        assert quality["ppl_quantized"] != quality["ppl_float"]


def graph(path):
    model = onnx.load(str(path))
    return model.graph.node, {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def reference_blockwise(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block-wise quantization in plain numpy, ONNX Runtime's MatMulNBits convention:
    blocks of `block` rows of one column of W [K, N]; scale = (the block's value of largest
    magnitude, sign kept) / -2^(bits-1), so that value maps to code 0; code = clip(round(w / scale)
    + 2^(bits-1), 0, 2^bits - 1); w ≈ (code - 2^(bits-1)) * scale. Returns (codes [N, K/block,
    block], scales [N, K/block])."""
    k, n = w.shape
    zp = 2 ** (bits - 1)
    blocks = w.T.reshape(n, k // block, block).astype(np.float64)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
    scale = extreme / -zp
    return np.clip(np.round(blocks / scale[..., None]) + zp, 0, 2 * zp - 1), scale


@pytest.mark.parametrize("role,bits", [("draft", 4), ("target", 8)])
def test_every_eligible_matmul_is_quantized_as_the_reference_says(int4_engine, pair_engine, role, bits):
    m = Manifest.load(int4_engine).roles[role]
    f_nodes, f_init = graph(pair_engine / role / "model.onnx")
    q_nodes, q_init = graph(int4_engine / role / "model.onnx")
    # eligible: MatMuls with a constant 2-D weight — per layer q, k, v, o, gate, up, down, plus the LM head
    eligible = {n.name: n for n in f_nodes if n.op_type == "MatMul" and f_init.get(n.input[1], np.zeros(0)).ndim == 2}
    assert len(eligible) == 7 * m.spec.num_layers + 1
    nbits = [n for n in q_nodes if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(eligible) == m.quantization["quantized_matmuls"]
    assert not [n for n in q_nodes if n.op_type == "MatMul" and n.input[1] in q_init]  # no float weight left
    by_weight = {n.input[1].removesuffix(".T"): n for n in eligible.values()}  # match by weight, not by the
    for node in nbits:  # tracer's node numbering (any change in the graph's other ops renumbers it)
        w = f_init[by_weight[node.input[1].removesuffix(f"_Q{bits}")].input[1]]
        k, n = w.shape
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]) == (k, n, bits, 32)
        assert len(node.input) == 3  # symmetric: no zero-point input (the default, 2^(bits-1))
        packed, scales = q_init[node.input[1]].astype(np.int64), q_init[node.input[2]]
        # layout: B [N, K/block, block*bits/8] uint8, 4-bit codes two per byte, the low nibble first
        codes = np.stack([packed & 15, packed >> 4], -1).reshape(n, k // 32, 32) if bits == 4 else packed
        ref_codes, ref_scales = reference_blockwise(w, bits, 32)
        np.testing.assert_allclose(scales, ref_scales, rtol=1e-6)
        np.testing.assert_array_equal(codes, ref_codes)
        dequant = ((codes - 2 ** (bits - 1)) * scales[..., None]).reshape(n, k).T
        assert (np.abs(dequant - w) <= np.abs(scales).repeat(32, 1).T * 1.0001).all()  # within one step


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
        assert 1e-4 * span < np.abs(lf - lq).max() < rel * span  # quantized, but not by much
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



def test_embedding_is_looked_up_from_block_quantized_rows(int4_engine, qwen_draft, qwen_target):
    """The embedding table is stored as codes (GatherBlockQuantized), none of it as float: the codes
    read back (plain numpy) are the role's block-wise quantization of the checkpoint's table."""
    from transformers import AutoModelForCausalLM

    from mtad_trt.export.quantize import dequantize_rows, fake_quantize

    for role, src, bits in (("draft", qwen_draft, 4), ("target", qwen_target, 8)):
        table = AutoModelForCausalLM.from_pretrained(str(src)).get_input_embeddings().weight.detach().numpy()
        v, h = table.shape
        nodes, init = graph(int4_engine / role / "model.onnx")
        gathers = [n for n in nodes if n.op_type == "GatherBlockQuantized"]
        assert len(gathers) == 1 and not [n for n in nodes if n.op_type == "Gather" and n.input[0] in init]
        assert not [name for name, a in init.items() if a.dtype == np.float32 and a.shape == (v, h)]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gathers[0].attribute}
        assert (attrs["bits"], attrs["block_size"], attrs["gather_axis"], attrs["quantize_axis"]) == (bits, 32, 0, 1)
        data, scales = init[gathers[0].input[0]], init[gathers[0].input[2]]
        assert data.shape == (v, h * bits // 8) and scales.shape == (v, h // 32)
        rows = dequantize_rows(data.reshape(v, h // 32, -1), scales, bits, 32, h)
        np.testing.assert_allclose(rows, fake_quantize(table, bits, 32), rtol=0, atol=1e-6)
        assert Manifest.load(int4_engine).roles[role].quantization["embedding"] == f"int{bits}"


def test_the_export_check_sees_the_quantized_lookup(qwen_target, tmp_path, monkeypatch):
    """Negative control: a reference that looks the embedding up in float (as if the graph did)
    no longer matches the float-activation graph, and the export refuses."""
    from mtad_trt.errors import MtadError
    from mtad_trt.export import reference

    monkeypatch.setattr(reference, "GATHER_KEY", "#not-quantized")
    with pytest.raises(MtadError, match="relative error"):
        export_pair(None, str(qwen_target), tmp_path / "e", max_seq_len=128, quantize={"target": "int4"},
                    block_size=32, embedding="quantized")


def test_embedding_float_keeps_the_table_and_costs_its_bytes(int4_engine, qwen_target, tmp_path):
    """The default (--embedding float): the table is stored as it is; the quantized one saves its bytes."""
    out = tmp_path / "float-table"
    m = export_pair(None, str(qwen_target), out, max_seq_len=256, quantize={"target": "int8"}, block_size=32)
    entry = m.roles["target"]
    assert entry.quantization["embedding"] == "float"
    nodes, _ = graph(out / "target" / "model.onnx")
    assert not [n for n in nodes if n.op_type == "GatherBlockQuantized"]
    v, h = entry.spec.vocab_size, 64
    saved = v * h * 4 - (v * h + v * (h // 32) * 4)  # the float table, less int8 codes and scales
    grown = entry.export["data_bytes"] - Manifest.load(int4_engine).roles["target"].export["data_bytes"]
    assert abs(grown - saved) <= 2 * 4096  # each tensor starts on a 4 KiB boundary


def test_quantized_table_beside_a_float_lm_head_on_a_tied_model(llama_target, tmp_path):
    """Tied embedding (the LM head reads the same checkpoint tensor) with --lm-head float: the lookup
    is quantized, the vocabulary matmul stays float, and the export's reference models both (it used
    to fail on any --lm-head float export: the fake quantizer has nothing for a float head)."""
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(llama_target)).tie_word_embeddings
    m = export_pair(None, str(llama_target), tmp_path / "e", max_seq_len=128, quantize={"target": "int4"},
                    block_size=32, embedding="quantized", lm_head="float")
    entry = m.roles["target"]
    assert (entry.quantization["embedding"], entry.quantization["lm_head"]) == ("int4", "float")
    assert entry.parity["full_model"]["passed"] and entry.parity["full_model"]["value"] < 1e-4
    nodes, init = graph(tmp_path / "e" / "target" / "model.onnx")
    assert [n.op_type for n in nodes].count("GatherBlockQuantized") == 1
    vocab = entry.spec.vocab_size
    head = [n for n in nodes if n.op_type == "MatMul" and n.input[1] in init and init[n.input[1]].shape[-1] == vocab]
    assert len(head) == 1 and init[head[0].input[1]].dtype == np.float32
