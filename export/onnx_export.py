"""The graph without the weights: a model built on the `meta` device, traced to ONNX.

The dynamo exporter (torch.onnx.export(dynamo=True)) traces with fake tensors, so a model whose
parameters live on the meta device — shapes and dtypes, no storage — exports the same graph a
loaded model would, at a few hundred MB of RAM for any model size. Two things need care:

- constant folding must stay off (`optimize=False`): it would try to read meta weights; the
  weight-side rewrites it would have done (transposed Linear weights) happen in `weights.py`,
  one tensor at a time, as the weights are written;
- non-persistent buffers (RoPE frequencies, Gemma's embedding scale) are not in a checkpoint:
  they are computed on the CPU with transformers' own initialisation of the module that owns
  them (`_materialize_buffers`), so they enter the graph as real constants.

The dynamic axes' automatic names (`s10`, expressions) are renamed to B/T/S/K afterwards so
TensorRT profiles and humans can read them.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import onnx
import torch

from mtad_trt.backends.device import TORCH_DTYPES
from mtad_trt.contract import ModelSpec
from mtad_trt.contract.wrapper import ContractWrapper
from mtad_trt.errors import MtadError


def example_inputs(spec: ModelSpec, dtype: torch.dtype, b: int = 1, t: int = 3, s: int = 5, k: int = 2,
                   device: str = "cpu"):
    """Inputs with distinct sizes per axis, so the tracer cannot merge B/T/S/K into one symbol."""
    ids = torch.zeros((b, t), dtype=torch.int64)
    pos = torch.arange(s, s + t, dtype=torch.int64).expand(b, t).contiguous()
    mask = torch.ones((b, 1, t, s + t), dtype=torch.bool)
    sliding = [mask.clone()] if spec.has_sliding_layers else []
    idx = torch.arange(t - k, t, dtype=torch.int64).expand(b, k).contiguous()
    past = [torch.zeros((b, spec.num_kv_heads, s, spec.head_dim), dtype=dtype) for _ in range(2 * spec.num_layers)]
    return tuple(x.to(device) for x in (ids, pos, mask, *sliding, idx, *past))


def meta_model(config: Any, dtype: str):
    """The causal LM of `config` with every parameter on the meta device (no weight memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=TORCH_DTYPES[dtype], attn_implementation="eager")
        except Exception as e:  # transformers raises many kinds for configs it cannot build
            raise MtadError(f"cannot build a causal LM from this config: {type(e).__name__}: {e}") from None
    model.eval()
    _materialize_buffers(model)
    return model


def _materialize_buffers(model) -> None:
    """Give every buffer a real CPU value, computed by transformers' own `_init_weights`.

    Each meta buffer is replaced by a NaN-filled CPU tensor and the owning module is
    re-initialised; a buffer still NaN afterwards is one transformers cannot compute without the
    weights, which the export refuses rather than guess.
    """
    for module in model.modules():
        metas = [(n, b) for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not metas:
            continue
        for n, b in metas:
            fill = float("nan") if b.is_floating_point() else 0
            module._buffers[n] = torch.full(tuple(b.shape), fill, dtype=b.dtype)
        with torch.no_grad():
            model._init_weights(module)
        for n, _ in metas:
            b = module._buffers[n]
            if b.is_floating_point() and bool(torch.isnan(b).any()):
                raise MtadError(f"cannot compute buffer {n} of {type(module).__name__} without loading the model")


def dynamic_shapes(spec: ModelSpec) -> tuple:
    B, T, S, K = (torch.export.Dim(n, min=1) for n in ("B", "T", "S", "K"))
    mask_dims = {0: B, 2: T, 3: torch.export.Dim.AUTO}
    rest = ([mask_dims] if spec.has_sliding_layers else []) + [{0: B, 1: K}] + [{0: B, 2: S}] * (2 * spec.num_layers)
    # the signature is (input_ids, position_ids, attention_mask, *rest): rest is one varargs tuple
    return ({0: B, 1: T}, {0: B, 1: T}, mask_dims, tuple(rest))


def trace(model, spec: ModelSpec, opset: int = 18, attention: str = "grouped"):
    """Trace the contract wrapper around `model` (meta or real) -> (onnx_ir Model, wrapper).

    The graph's initializers still hold the module's (meta) tensors: `weights.bind` replaces them.
    """
    wrapper = ContractWrapper(model, attention, topk=spec.topk_head).eval()
    if wrapper.sliding != spec.has_sliding_layers:
        raise ValueError("the wrapper and the spec disagree about sliding-window layers")
    device = next(model.parameters()).device.type
    args = example_inputs(spec, TORCH_DTYPES[spec.dtype], device=device)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for noisy in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
        program = torch.onnx.export(
            wrapper,
            args,
            dynamic_shapes=dynamic_shapes(spec),
            input_names=spec.input_names,
            output_names=spec.output_names,
            opset_version=opset,
            dynamo=True,
            optimize=False,
            verbose=False,
        )
    return program.model, wrapper


def rename_dims(model: onnx.ModelProto, spec: ModelSpec) -> None:
    """Give every dynamic axis its contract name (B, T, S, K, S+T) in the graph's I/O."""
    names = spec.io_dims()
    for vi in list(model.graph.input) + list(model.graph.output):
        want = names.get(vi.name)
        if want is None:
            continue
        for dim, w in zip(vi.type.tensor_type.shape.dim, want, strict=False):
            if isinstance(w, str):
                dim.ClearField("dim_value")
                dim.dim_param = w
