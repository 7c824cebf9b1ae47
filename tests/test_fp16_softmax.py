"""An fp16 export normalises attention in float32 (docs/gpu.md, "fp16 attention softmax").

`torch.softmax(w, dim=-1, dtype=torch.float32)` on an fp16 tensor is computed in float32 by torch,
but the ONNX exporter (onnxscript's aten::softmax.int) emits Softmax on the fp16 input and casts its
output, so a strongly typed TensorRT plan would run the softmax in fp16. The wrapper casts first.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn

from mtad_trt.contract import spec_from_model
from mtad_trt.export.role import export_onnx
from tiny import make_model

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def softmax_types(path: Path) -> list[tuple[int, int]]:
    """(input dtype, output dtype) of every Softmax node, from ONNX shape inference."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    return [(types.get(n.input[0], 0), types.get(n.output[0], 0)) for n in model.graph.node if n.op_type == "Softmax"]


def test_fp16_graph_softmax_runs_in_float32(tmp_path) -> None:
    model = make_model("qwen2", 320, 2, seed=0, eos=0, pad=0).to(torch.float16)
    spec = spec_from_model(model, "float16", 128)
    path = tmp_path / "model.onnx"
    export_onnx(model, spec, path)
    found = softmax_types(path)
    assert len(found) == spec.num_layers and all(t == (FLOAT, FLOAT) for t in found), found


class DtypeArgSoftmax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1, dtype=torch.float32)


def test_why_the_wrapper_casts_first(tmp_path) -> None:
    """The exporter's behaviour the wrapper works around. If this fails, torch/onnxscript now
    export softmax(dtype=float32) in float32 and the explicit cast in `grouped_attention` is moot."""
    path = tmp_path / "softmax.onnx"
    torch.onnx.export(DtypeArgSoftmax().eval(), (torch.zeros(2, 8, dtype=torch.float16),), str(path), dynamo=True,
                      optimize=False, verbose=False)
    assert softmax_types(path) == [(FLOAT16, FLOAT16)]
