"""Weight-only quantization for the ONNX Runtime CPU path: `MatMulNBits` for the matmuls and
`GatherBlockQuantized` for the embedding lookup, one block of rows at a time.

`int4` / `int8`: ONNX Runtime's block-wise `MatMulNBits`, symmetric (asymmetric int8-compute
kernels give wrong single-token results on AVX2-only CPUs), `accuracy_level=4` (int8 activations
inside the kernel, which the prototype measured 2.3-2.9x faster than the default at the same
perplexity). The codes come from ONNX Runtime's own quantization kernel, the one its
`MatMulNBitsQuantizer` calls, applied to one block of weight rows at a time: a weight row of the
checkpoint ([N, K], one output column) quantizes independently of every other, so blocks of rows
concatenate into exactly the codes of the whole matrix. These graphs use ONNX Runtime-only
operators: TensorRT refuses them.

The check that matters for a quantized model is output quality, not logit parity: the export
records the perplexity of the engine and of the float reference on the same prose sample.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

if TYPE_CHECKING:
    from mtad_trt.export.weights import Entry

SCHEMES = {"none": 0, "int8": 8, "int4": 4}
LM_HEAD = {"same": None, "float": 0, "int8": 8, "int4": 4}  # --lm-head: bits for the LM head (None: the role's)
EMBEDDING = {"float": 0, "quantized": None}  # --embedding: the table stays float, or takes the role's scheme


def quantize_rows(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits codes and scales of HF weight rows w [c, K] (= output columns of Wᵀ)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    c, k = w.shape
    kb = (k + block_size - 1) // block_size
    kpack = 8 // bits
    if k == kb * block_size:
        wt = np.ascontiguousarray(w.T)
    else:  # the last block is zero-padded, as ONNX Runtime's own quantizer pads it
        wt = np.zeros((kb * block_size, c), dtype=np.float32)
        wt[:k] = w.T
    packed = np.zeros((c, kb, (block_size + kpack - 1) // kpack), dtype=np.uint8)
    scales = np.zeros((c, kb), dtype=np.float32)
    zero = np.zeros((c, (kb + kpack - 1) // kpack), dtype=np.uint8)
    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    fn(packed, wt, scales, zero, block_size, c, k, True)
    return packed, scales


def dequantize_rows(packed: np.ndarray, scales: np.ndarray, bits: int, block_size: int, k: int) -> np.ndarray:
    """The float rows [c, K] that MatMulNBits codes stand for, in plain numpy (an independent reading
    of the layout: 4-bit codes two per byte, low nibble first; symmetric, zero point 2^(bits-1))."""
    c, kb, _ = packed.shape
    if bits == 4:
        codes = np.stack([packed & 15, packed >> 4], -1).reshape(c, kb, -1)
    else:
        codes = packed
    w = (codes[..., :block_size].astype(np.float32) - 2 ** (bits - 1)) * scales[..., None]
    return w.reshape(c, kb * block_size)[:, :k]


def fake_quantize(w: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """What a quantized engine multiplies by instead of w [c, K]: quantize, then dequantize."""
    packed, scales = quantize_rows(w, bits, block_size)
    return dequantize_rows(packed, scales, bits, block_size, w.shape[1])



def _swap(graph: ir.Graph, node: ir.Node, new: ir.Node) -> None:
    """Put `new` where `node` was: its output takes over the old output's name, shape, type and uses."""
    graph.insert_before(node, new)
    old_out = node.outputs[0]
    ir.convenience.replace_all_uses_with(old_out, new.outputs[0], replace_graph_outputs=True)
    new.outputs[0].name, old_out.name = old_out.name, None
    new.outputs[0].shape, new.outputs[0].type = old_out.shape, old_out.type
    graph.remove(node, safe=True)


def quantize_matmuls(graph_model: ir.Model, entries: list[Entry], bits: int, block_size: int,
                     vocab_size: int, lm_head_bits: int | None = None, accuracy_level: int = 4) -> list[Entry]:
    """Every MatMul over a stored Wᵀ -> MatMulNBits over W's block-quantized rows.

    The LM head (the MatMul whose output is the vocabulary) gets `lm_head_bits` (0: stays float;
    None: `bits` like the rest): it is the largest matrix and the one a small draft is most
    sensitive to."""
    from mtad_trt.export.weights import Entry

    graph = graph_model.graph
    by_value = {id(e.value): e for e in entries if e.transpose}
    out = list(entries)
    count = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.inputs[1] is None:
            continue
        e = by_value.get(id(node.inputs[1]))
        if e is None:
            continue
        k, n = e.shape
        b = bits if n != vocab_size or lm_head_bits is None else lm_head_bits
        if b == 0:
            continue
        kpack = 8 // b
        kb = (k + block_size - 1) // block_size
        blob = (block_size + kpack - 1) // kpack
        base = e.value.name.removesuffix(".T")
        codes = ir.Value(name=f"{base}_Q{b}", shape=ir.Shape([n, kb, blob]), type=ir.TensorType(ir.DataType.UINT8))
        scales = ir.Value(name=f"{base}_scales", shape=ir.Shape([n, kb]), type=ir.TensorType(ir.DataType.FLOAT))
        attrs = {"K": k, "N": n, "bits": b, "block_size": block_size}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        new = ir.node("MatMulNBits", inputs=[node.inputs[0], codes, scales], attributes=attrs,
                      domain="com.microsoft", name=f"{node.name}_Q{b}")
        _swap(graph, node, new)
        out.append(Entry(codes, ir.DataType.UINT8, (n, kb, blob), source=e.source,
                         quant={"bits": b, "block_size": block_size}, scales=scales))
        count += 1
        if not e.value.uses():
            out.remove(e)
    if count:
        graph_model.opset_imports.setdefault("com.microsoft", 1)
    return out


GATHER_KEY = "#gather"  # suffix of an embedding's key in the quantized-weights record (its LM head may differ)


def quantize_gathers(graph_model: ir.Model, entries: list[Entry], bits: int, block_size: int,
                     vocab_size: int) -> list[Entry]:
    """The embedding lookup `Gather(E [V, H], ids)` -> ONNX Runtime's `GatherBlockQuantized`.

    E's rows are quantized exactly as `quantize_rows` quantizes a weight's rows (blocks along H,
    symmetric, the same codes and scales layout, stored as [V, H·bits/8]), so one reading of the
    codes serves both operators. In a float32 int4 graph the embedding was the largest float tensor
    left (V·H·4 bytes: 0.93 GB of the 1.5B target's 1.75 GB, 2.2 GB of a 7B's 5.9 GB); its lookup
    reads T rows a step, so the codes cost nothing in speed (measured: docs/export.md). Opt-in
    (`--embedding quantized`). H must be a multiple of the block (the operator has no padded last
    block); otherwise the embedding stays float."""
    from mtad_trt.export.weights import Entry

    if bits == 0 or block_size < 16 or block_size & (block_size - 1):
        return entries
    graph = graph_model.graph
    by_value = {id(e.value): e for e in entries if e.source is not None and not e.transpose and e.quant is None}
    out = list(entries)
    for node in list(graph):
        if node.op_type != "Gather" or node.inputs[0] is None:
            continue
        e = by_value.get(id(node.inputs[0]))
        axis = node.attributes.get("axis")
        if e is None or len(e.shape) != 2 or e.shape[0] != vocab_size or (axis is not None and axis.as_int() != 0):
            continue
        v, h = e.shape
        if h % block_size:
            continue
        kb = h // block_size
        codes = ir.Value(name=f"{e.value.name}_G{bits}", shape=ir.Shape([v, h * bits // 8]),
                         type=ir.TensorType(ir.DataType.UINT8))
        scales = ir.Value(name=f"{e.value.name}_G{bits}_scales", shape=ir.Shape([v, kb]),
                          type=ir.TensorType(ir.DataType.FLOAT))
        new = ir.node("GatherBlockQuantized", inputs=[codes, node.inputs[1], scales], domain="com.microsoft",
                      attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block_size, "bits": bits},
                      name=f"{node.name}_G{bits}")
        _swap(graph, node, new)
        out.append(Entry(codes, ir.DataType.UINT8, (v, h * bits // 8), source=e.source,
                         quant={"bits": bits, "block_size": block_size, "key": e.source + GATHER_KEY}, scales=scales))
        if not e.value.uses():
            graph.initializers.pop(e.value.name, None)
            out.remove(e)
        graph_model.opset_imports.setdefault("com.microsoft", 1)
    return out
