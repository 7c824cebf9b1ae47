"""Trace the contract wrapper to ONNX with dynamic B, T, S, K.

Uses the dynamo exporter (torch.onnx.export(dynamo=True)); its automatic dimension names
(`s10`, expressions) are renamed to B/T/S/K afterwards so TensorRT profiles and humans can read them.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch

from mtad_trt.backends.device import TORCH_DTYPES
from mtad_trt.contract import ModelSpec
from mtad_trt.contract.wrapper import ContractWrapper


def example_inputs(spec: ModelSpec, dtype: torch.dtype, b: int = 1, t: int = 3, s: int = 5, k: int = 2):
    """Inputs with distinct sizes per axis, so the tracer cannot merge B/T/S/K into one symbol."""
    ids = torch.zeros((b, t), dtype=torch.int64)
    pos = torch.arange(s, s + t, dtype=torch.int64).expand(b, t).contiguous()
    mask = torch.ones((b, 1, t, s + t), dtype=torch.bool)
    sliding = [mask.clone()] if spec.has_sliding_layers else []
    idx = torch.arange(t - k, t, dtype=torch.int64).expand(b, k).contiguous()
    past = [torch.zeros((b, spec.num_kv_heads, s, spec.head_dim), dtype=dtype) for _ in range(2 * spec.num_layers)]
    return (ids, pos, mask, *sliding, idx, *past)


def export_onnx(
    model: torch.nn.Module, spec: ModelSpec, out_path: Path, opset: int = 18, attention: str = "grouped"
) -> None:
    dtype = TORCH_DTYPES[spec.dtype]
    wrapper = ContractWrapper(model, attention, topk=spec.topk_head).eval()
    args = example_inputs(spec, dtype)
    B, T, S, K = (torch.export.Dim(n, min=1) for n in ("B", "T", "S", "K"))
    if wrapper.sliding != spec.has_sliding_layers:
        raise ValueError("the wrapper and the spec disagree about sliding-window layers")
    mask_dims = {0: B, 2: T, 3: torch.export.Dim.AUTO}
    rest = ([mask_dims] if spec.has_sliding_layers else []) + [{0: B, 1: K}] + [{0: B, 2: S}] * (2 * spec.num_layers)
    # the signature is (input_ids, position_ids, attention_mask, *rest): rest is one varargs tuple
    dynamic_shapes = ({0: B, 1: T}, {0: B, 1: T}, mask_dims, tuple(rest))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for noisy in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        program = torch.onnx.export(
            wrapper,
            args,
            dynamic_shapes=dynamic_shapes,
            input_names=spec.input_names,
            output_names=spec.output_names,
            opset_version=opset,
            dynamo=True,
            external_data=True,
            verbose=False,
        )
    program.save(str(out_path), external_data=True)
    _rename_dims(out_path, spec)


def _rename_dims(path: Path, spec: ModelSpec) -> None:
    """Give every dynamic axis its contract name (B, T, S, K, S+T) in the graph's I/O."""
    model = onnx.load(str(path), load_external_data=False)
    names = spec.io_dims()
    for vi in list(model.graph.input) + list(model.graph.output):
        want = names.get(vi.name)
        if want is None:
            continue
        for dim, w in zip(vi.type.tensor_type.shape.dim, want, strict=False):
            if isinstance(w, str):
                dim.ClearField("dim_value")
                dim.dim_param = w
    onnx.save(model, str(path))
