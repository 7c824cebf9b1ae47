"""Export: parity against transformers, the engine folder contract, atomicity."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM

from mtad_trt.backends.ort import OrtRunner
from mtad_trt.backends.rows import Row
from mtad_trt.errors import MtadError
from mtad_trt.export import role as role_mod
from mtad_trt.export.pair import export_pair
from mtad_trt.export.parity import check_parity, reference_cases
from mtad_trt.folder.manifest import Manifest


def test_engine_folder_contract(pair_engine):
    m = Manifest.load(pair_engine)
    assert set(m.roles) == {"draft", "target"}
    for _role, entry in m.roles.items():
        assert (pair_engine / entry.onnx).is_file()
        assert entry.parity["passed"] and entry.parity["worst"] <= 1e-4
        assert set(entry.parity["max_abs_diff"]) == {"prefill", "decode", "chunk", "tree", "topk_head",
                                                     "long_prefill", "long_decode", "long_tree"}
        # the long case reaches the largest S bucket (capacity 256: buckets 128, 256)
        assert entry.parity["long"]["bucket"] == 256 and entry.parity["where"]["long_decode"]["context"] > 128
        assert len(entry.onnx_sha256) == 64
        graph = onnx.load(str(pair_engine / entry.onnx), load_external_data=False)
        names = [i.name for i in graph.graph.input]
        assert names[:4] == ["input_ids", "position_ids", "attention_mask", "logits_index"]
        dims = [d.dim_param for d in graph.graph.input[2].type.tensor_type.shape.dim]
        assert dims == ["B", "", "T", "S+T"]
        assert any(o.name == "new_key_values.0.key" for o in graph.graph.output)
        outputs = [o.name for o in graph.graph.output]
        assert outputs[:4] == ["logits", "topk_values", "topk_indices", "logsumexp"] and entry.spec.topk_head == 64
    assert (pair_engine / "tokenizer" / "tokenizer.json").is_file()
    assert m.roles["draft"].spec.num_layers == 1 and m.roles["target"].spec.num_layers == 2
    assert json.loads((pair_engine / "manifest.json").read_text())["format_version"] == 1


@pytest.mark.parametrize("fixture,attention", [("llama_target", "grouped"), ("qwen_target", "grouped"),
                                               ("qwen_target", "eager")])
def test_parity_tiny_models(request, fixture, attention, tmp_path):
    src = request.getfixturevalue(fixture)
    out = tmp_path / "e"
    m = export_pair(None, str(src), out, max_seq_len=128, attention=attention)
    assert m.roles["target"].parity["worst"] <= 1e-4
    # Independently of the export's own check: several seeds of random text.
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    engine = OrtRunner(out / "target/model.onnx", m.roles["target"].spec)
    for seed in (1, 2):
        cases = reference_cases(model, m.roles["target"].spec, seed=seed)
        assert check_parity(cases, engine, tolerance=1e-4)["passed"]


def test_random_trees_equal_causal_paths(pair_engine, qwen_target):
    """P9: tree-masked logits of node (d, j) == a plain causal forward over c + path(d, j)."""
    m = Manifest.load(pair_engine)
    spec = m.roles["target"].spec
    model = AutoModelForCausalLM.from_pretrained(str(qwen_target), dtype=torch.float32).eval()
    seq = Row(OrtRunner(pair_engine / "target/model.onnx", spec))
    rng = np.random.default_rng(0)
    for _ in range(3):
        seq.reset()
        ctx = [int(x) for x in rng.integers(0, spec.vocab_size, 7)]
        seq.forward(ctx)
        seq.commit_chain(len(ctx))
        n = 9
        parents = [-1] + [int(rng.integers(-1, i)) for i in range(1, n)]
        toks = [int(x) for x in rng.integers(0, spec.vocab_size, n)]
        got = seq.forward(toks, parents=parents, logits_rows=range(n))
        for i in range(n):
            path, j = [], i
            while j >= 0:
                path.append(toks[j])
                j = parents[j]
            with torch.no_grad():
                want = model(torch.tensor([ctx + path[::-1]])).logits[0, -1].numpy()
            assert np.abs(got[i] - want).max() < 1e-4


def test_failed_parity_leaves_nothing(tmp_path, qwen_target, monkeypatch):
    def bad(*a, **k):
        return {"max_abs_diff": {"long_decode": 1.0}, "worst": 1.0, "tolerance": 1e-3, "passed": False,
                "worst_case": "long_decode", "where": {"long_decode": {"position": 612, "context": 613, "bucket": 1024}}}

    monkeypatch.setattr(role_mod, "check_parity", bad)
    out = tmp_path / "engines" / "x"
    with pytest.raises(MtadError) as err:
        export_pair(None, str(qwen_target), out)
    assert str(err.value) == ("parity: target logits differ by 1e0 (tolerance 1e-3) at position 612 of a "
                              "613-token context (S bucket 1024, long decode); truncated model: 2 of 2 layers, vocab 320")
    assert not out.exists()
    assert list((tmp_path / "engines").iterdir()) == []  # no temporary folder left behind


def test_force_replaces_and_refuses_without(tmp_path, qwen_target):
    out = tmp_path / "e"
    export_pair(None, str(qwen_target), out, max_seq_len=64)
    with pytest.raises(MtadError, match="already exists"):
        export_pair(None, str(qwen_target), out, max_seq_len=64)
    export_pair(None, str(qwen_target), out, max_seq_len=96, force=True)
    assert Manifest.load(out).roles["target"].spec.max_seq_len == 96
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def _gemma3(window: int = 16):
    from mtad_trt.contract import spec_from_model
    from tiny import make_arch

    model = make_arch("gemma3", window=window, seed=5)
    spec = spec_from_model(model, "float32", 256)
    spec.topk_head = 16
    return model, spec


def test_long_case_layout_past_window_and_in_largest_bucket():
    from mtad_trt.export.parity import long_layout

    _, spec = _gemma3()
    lay = long_layout(spec)
    assert lay["context"] == 136 and lay["split"] == 120 and lay["past_window"]  # 120 in bucket 128, then 256
    spec.sliding_window = 600  # a window past the capacity cannot be exceeded: say so
    spec.max_seq_len = 2048
    lay = long_layout(spec)
    assert lay["context"] == 1032 and lay["split"] == 1016 and lay["past_window"] is True
    spec.sliding_window = 4096
    assert long_layout(spec)["past_window"] is False


def test_parity_catches_a_window_the_short_cases_never_reach(monkeypatch):
    """Negative control: a runtime that ignores the sliding window passes every short case (16
    tokens fit in the window) and fails the long one, with one line saying where."""
    from mtad_trt.backends import rows
    from mtad_trt.backends.torch_backend import TorchRunner
    from mtad_trt.export.parity import failure_line

    model, spec = _gemma3()
    runner = TorchRunner(model, spec)
    cases = reference_cases(model, spec)
    good = check_parity(cases, runner)
    assert good["passed"] and good["worst"] <= 1e-4 and good["long"]["past_window"]

    def no_window(inp, r, n, t, s, cache_ancestors):
        inp.sliding_mask[r, 0, :t] = inp.attention_mask[r, 0, :t]

    monkeypatch.setattr(rows, "_window", no_window)
    bad = check_parity(cases, runner)
    assert not bad["passed"]
    assert all(bad["max_abs_diff"][c] <= 1e-4 for c in ("prefill", "decode", "chunk", "tree", "topk_head"))
    assert bad["worst_case"].startswith("long_") and bad["where"][bad["worst_case"]]["position"] >= 16
    line = failure_line(bad, "target")
    assert re.fullmatch(r"parity: target logits differ by \d(\.\d)?e-?\d+ \(tolerance 1e-3\) at position \d+ "
                        r"of a \d+-token context \(S bucket (128|256), (long prefill|long decode|tree from scratch "
                        r"slots)\)", line), line


def test_reference_is_transformers_eager_not_the_wrappers_attention(monkeypatch):
    """The reference must not share the wrapper's attention function: a broken one fails parity
    (with the wrapper's function as the reference too, both sides would agree)."""
    from transformers import AttentionInterface

    from mtad_trt.backends.torch_backend import TorchRunner
    from mtad_trt.contract import wrapper

    model, spec = _gemma3()
    runner = TorchRunner(model, spec)  # sets the model's attention to the wrapper's

    def skewed(module, query, key, value, attention_mask, scaling, **kw):
        return wrapper.grouped_attention(module, query, key, value, attention_mask, scaling * 1.5, **kw)

    AttentionInterface.register(wrapper.ATTN_NAME, skewed)
    try:
        result = check_parity(reference_cases(model, spec), runner)
    finally:
        AttentionInterface.register(wrapper.ATTN_NAME, wrapper.grouped_attention)
    assert not result["passed"] and result["worst"] > 1e-2
