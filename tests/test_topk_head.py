"""The top-k head's logsumexp survives TensorRT: no ReduceLogSumExp in the graph (NVIDIA/TensorRT#4772).

TensorRT's ONNX parser lowers ReduceLogSumExp to log(sum(exp(x))) without subtracting the row's
maximum, so every logit above ~88.7 overflows fp32 (above ~11 in fp16) and the head's logsumexp
becomes inf. The wrapper writes it out as max + log(sum(exp(x - max))) instead. These tests cannot
run TensorRT; they run the exported graph with ONNX Runtime after rewriting any ReduceLogSumExp the
way TensorRT's parser does (`lower_like_tensorrt`), on logits of 100 ± 50, and show with the old
formulation (torch.logsumexp) that this emulation does produce the overflow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from torch import nn

from mtad_trt.contract import ModelSpec, spec_from_model
from mtad_trt.contract import wrapper as wrapper_mod
from mtad_trt.contract.wrapper import ContractWrapper, stable_logsumexp
from mtad_trt.export.onnx_export import example_inputs
from mtad_trt.export.role import export_onnx
from tiny import make_model

VOCAB, TOPK, MEAN, SPREAD = 320, 16, 100.0, 50.0
IDS = [[5, 17, 200]]  # token 0 is the padding row of the embedding: zero hidden state, zero logits


def large_logit_model(dtype: torch.dtype) -> nn.Module:
    """A tiny Qwen2 whose LM head gives logits of about MEAN ± SPREAD (a biased head, rescaled)."""
    model = make_model("qwen2", VOCAB, 1, seed=3, eos=0, pad=0)
    spec = spec_from_model(model, "float32", 128)
    with torch.no_grad():
        std = float(ContractWrapper(model)(*inputs(spec, torch.float32))[0].std())
        old = model.lm_head
        head = nn.Linear(old.in_features, old.out_features, bias=True)
        head.weight.copy_(old.weight * (SPREAD / std))
        head.bias.fill_(MEAN)
    model.lm_head = head
    return model.to(dtype).eval()


def inputs(spec: ModelSpec, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    args = list(example_inputs(spec, dtype))  # B=1, T=3, S=5 (a zero cache), K=2
    args[0] = torch.tensor(IDS)
    return tuple(args)


def export(folder: Path, dtype: str) -> tuple[Path, ModelSpec, nn.Module]:
    model = large_logit_model(getattr(torch, dtype))
    spec = spec_from_model(model, dtype, 128)
    spec.topk_head = TOPK
    path = folder / "model.onnx"
    export_onnx(model, spec, path)
    return path, spec, model


def lower_like_tensorrt(path: Path) -> Path:
    """The graph as TensorRT's parser builds it: each ReduceLogSumExp becomes Log(ReduceSum(Exp(x))),
    with no max subtracted (NVIDIA/TensorRT#4772). Written next to `path` (same external data)."""
    model = onnx.load(str(path), load_external_data=False)
    nodes = []
    for n in model.graph.node:
        if n.op_type != "ReduceLogSumExp":
            nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        exp, total = f"{n.output[0]}_trt_exp", f"{n.output[0]}_trt_sum"
        nodes += [helper.make_node("Exp", [n.input[0]], [exp]),
                  helper.make_node("ReduceSum", [exp, *n.input[1:]], [total], **attrs),
                  helper.make_node("Log", [total], list(n.output))]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    out = path.with_name("lowered_like_trt.onnx")
    onnx.save(model, str(out))
    return out


def run_head(path: Path, spec: ModelSpec, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(logits [1, K, V], logsumexp [1, K]) of the graph under ONNX Runtime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: t.numpy() for name, t in zip(spec.input_names, inputs(spec, dtype), strict=True)}
    out = dict(zip(spec.output_names, session.run(None, feeds), strict=True))
    return out["logits"], out["logsumexp"]


def reference_lse(logits: np.ndarray) -> np.ndarray:
    return torch.logsumexp(torch.from_numpy(logits).double(), dim=-1).numpy()


def op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


@pytest.fixture(scope="module", params=["float32", "float16"])
def exported(request, tmp_path_factory):
    return export(tmp_path_factory.mktemp(f"topk_{request.param}"), request.param)


def test_graph_has_no_reducelogsumexp(exported) -> None:
    path, _, _ = exported
    ops = op_types(path)
    assert "ReduceLogSumExp" not in ops and "TopK" in ops
    assert {"Exp", "ReduceSum", "Log"} <= ops


def test_head_logsumexp_on_large_logits_as_tensorrt_parses_it(exported) -> None:
    """The graph, lowered like TensorRT, on logits of 100 ± 50: finite and equal to logsumexp."""
    path, spec, _ = exported
    logits, lse = run_head(lower_like_tensorrt(path), spec, getattr(torch, spec.dtype))
    assert logits.max() > 120 and logits.min() < 80  # the overflow range of a max-less fp32 exp
    assert np.isfinite(lse).all()
    np.testing.assert_allclose(lse, reference_lse(logits), rtol=1e-6, atol=1e-4)


def test_wrapper_logsumexp_matches_torch(exported) -> None:
    """The wrapper itself (the torch backend and the export trace the same module)."""
    _, spec, model = exported
    with torch.no_grad():
        logits, _, _, lse, *_ = ContractWrapper(model, topk=TOPK)(*inputs(spec, getattr(torch, spec.dtype)))
    assert logits.dtype == lse.dtype == torch.float32 and float(logits.max()) > 120
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits.double(), dim=-1), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stable_logsumexp_directly(dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = (MEAN + SPREAD * torch.randn(4, 3, VOCAB, generator=g)).to(dtype)
    got = stable_logsumexp(x, x.max(dim=-1, keepdim=True).values)
    assert got.dtype == dtype and torch.isfinite(got).all()
    want = torch.logsumexp(x.double(), dim=-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-3 if dtype == torch.float16 else 1e-6, atol=0.0)
    edge = torch.tensor([[1.0, 2.0, float("inf")], [-float("inf")] * 3, [-float("inf"), 0.0, 1.0]], dtype=dtype)
    torch.testing.assert_close(stable_logsumexp(edge, edge.max(dim=-1, keepdim=True).values),
                               torch.logsumexp(edge, dim=-1))  # +inf, -inf (not NaN), finite


def test_the_emulation_catches_the_old_formulation(tmp_path, monkeypatch) -> None:
    """Negative control: with torch.logsumexp the graph has ReduceLogSumExp, and lowered like
    TensorRT it overflows to inf on these logits (what the tests above would then catch)."""
    monkeypatch.setattr(wrapper_mod, "stable_logsumexp", lambda logits, top: torch.logsumexp(logits, dim=-1))
    path, spec, _ = export(tmp_path, "float32")
    assert "ReduceLogSumExp" in op_types(path)
    _, lse = run_head(path, spec, torch.float32)
    assert np.isfinite(lse).all()  # ONNX Runtime's own kernel subtracts the max
    _, lowered = run_head(lower_like_tensorrt(path), spec, torch.float32)
    assert np.isinf(lowered).any()
