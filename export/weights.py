"""Weights into a traced graph, one tensor at a time: bind, rewrite, stream to external data.

`trace` (onnx_export.py) leaves a graph whose initializers are the module's meta tensors. Here
each initializer is bound to what fills it — a checkpoint tensor (by the parameter's name in the
model) or a computed buffer — and the graph gets the two rewrites the weights need:

- `Transpose(W) -> MatMul` (how the exporter writes `nn.Linear`) becomes `MatMul(Wᵀ)` with the
  transposed weight stored, as constant folding would have done, so no runtime pays a transpose;
- with weight-only quantization, each such MatMul becomes ONNX Runtime's `MatMulNBits`
  (`quantize.quantize_matmuls`) and the embedding lookup `GatherBlockQuantized`
  (`quantize.quantize_gathers`), their codes computed block by block as the rows stream past.

Then `write` streams every tensor into one external-data file: a block of rows is read from the
source as float32, converted (float16 / bfloat16 / transposed / quantized), written and dropped.
Peak memory is one block, whatever the model's size. Transposed blocks are written column-wise
with positioned writes, so even the LM head never needs a second full copy. Every tensor starts
at a 4 KiB boundary (ONNX Runtime can map such data instead of copying it).
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from mtad_trt.errors import MtadError
from mtad_trt.export.quantize import quantize_rows
from mtad_trt.export.tensors import TensorInfo, TensorSource, row_blocks, to_bf16_bits

ALIGN = 4096
BLOCK_BYTES = 128 * 2**20  # float32 bytes of source rows converted at once

Progress = Callable[[str, int, int], None]  # (tensor name, parameters done, parameters in all)


@dataclass
class Entry:
    """One initializer of the final graph and where its bytes come from."""

    value: ir.Value  # the graph value it fills
    dtype: ir.DataType  # what is stored
    shape: tuple[int, ...]
    source: str | None = None  # checkpoint tensor (float32 rows come from source.read)
    constant: np.ndarray | None = None  # or a value computed at export (RoPE frequencies)
    transpose: bool = False  # store the source's [N, K] as [K, N]
    quant: dict | None = None  # {"bits", "block_size"[, "key"]}: store block-quantized codes of the source rows
    scales: ir.Value | None = None  # quant: the scales value, written right after the codes


def stored_bytes(e: Entry) -> int:
    """Bytes an entry takes in the data file (codes and scales for a quantized weight)."""
    n = int(e.dtype.itemsize) * int(np.prod(e.shape, dtype=np.int64))
    return n + (4 * int(np.prod(_scales_shape(e))) if e.quant is not None else 0)


def _scales_shape(e: Entry) -> tuple[int, ...]:
    """[rows, blocks per row] of a quantized entry (its codes are [rows, blocks, blob] for MatMulNBits,
    [rows, blocks·blob] for GatherBlockQuantized)."""
    return tuple(int(d) for d in e.scales.shape)


def param_names(model) -> dict[int, list[str]]:
    """Every name each parameter goes by (tied weights have several), keyed by the parameter's id."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return names


def bind(graph_model: ir.Model, wrapper, model, source: TensorSource) -> list[Entry]:
    """Decide what fills each initializer of the traced graph; check shapes against the source."""
    owners: dict[str, object] = dict(wrapper.named_parameters(remove_duplicate=False))
    buffers = dict(wrapper.named_buffers(remove_duplicate=False))
    model_names = param_names(model)
    available = set(source.names())
    entries = []
    for name, value in graph_model.graph.initializers.items():
        shape = tuple(int(d) for d in value.shape)
        dtype = value.dtype
        if name in owners:
            candidates = model_names.get(id(owners[name]), [])
            found = next((c for c in candidates if c in available), None)
            if found is None:
                raise MtadError(f"{source.path}: the checkpoint has no tensor for {candidates[0] if candidates else name}"
                                f" (looked for {', '.join(candidates) or name})")
            info = source.info(found)
            if tuple(info.shape) != shape:
                raise MtadError(f"{info.file}: tensor {found} has shape {list(info.shape)}; the config needs {list(shape)}")
            entries.append(Entry(value, dtype, shape, source=found))
            continue
        tensor = buffers.get(name)
        if tensor is None:
            tensor = getattr(value.const_value, "raw", None)
        if tensor is None or getattr(tensor, "is_meta", False):
            raise MtadError(f"graph constant {name} has no value and no checkpoint tensor")
        arr = tensor.detach().float().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)
        entries.append(Entry(value, dtype, shape, constant=arr))
    return entries


def fold_transposes(graph_model: ir.Model, entries: list[Entry]) -> list[Entry]:
    """`Transpose(W, perm=[1,0])` feeding only MatMuls -> a stored Wᵀ (a new initializer)."""
    graph = graph_model.graph
    by_value = {id(e.value): e for e in entries}
    out = list(entries)
    for node in list(graph):
        if node.op_type != "Transpose" or node.inputs[0] is None:
            continue
        e = by_value.get(id(node.inputs[0]))
        perm = node.attributes.get("perm")
        if e is None or e.source is None or len(e.shape) != 2 or (perm is not None and list(perm.as_ints()) != [1, 0]):
            continue
        result = node.outputs[0]
        if not result.uses() or any(u.node.op_type != "MatMul" or u.idx != 1 for u in result.uses()):
            continue
        k, n = e.shape[1], e.shape[0]
        t = ir.Value(name=f"{e.value.name}.T", shape=ir.Shape([k, n]), type=ir.TensorType(e.dtype))
        ir.convenience.replace_all_uses_with(result, t)
        graph.remove(node, safe=True)
        out.append(Entry(t, e.dtype, (k, n), source=e.source, transpose=True))
        if not e.value.uses():
            graph.initializers.pop(e.value.name)
            out.remove(e)
    return out


class _DataFile:
    """The external-data file: aligned starts, a running sha256, positioned writes for transposes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.end = 0

    def reserve(self, nbytes: int) -> int:
        start = (self.end + ALIGN - 1) // ALIGN * ALIGN
        self.end = start + nbytes
        return start

    def put(self, offset: int, data: np.ndarray) -> None:
        view = memoryview(np.ascontiguousarray(data)).cast("B")
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def close(self) -> str:
        os.ftruncate(self.fd, self.end)
        os.close(self.fd)
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            while chunk := f.read(2**24):
                h.update(chunk)
        return h.hexdigest()


def _cast(x: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    if dtype == ir.DataType.FLOAT:
        return x.astype(np.float32, copy=False)
    if dtype == ir.DataType.FLOAT16:
        return x.astype(np.float16)
    if dtype == ir.DataType.BFLOAT16:
        return to_bf16_bits(x)
    raise MtadError(f"cannot store a weight as {dtype}")


def _external(value: ir.Value, location: str, base: Path, offset: int, nbytes: int, dtype, shape) -> None:
    value.const_value = ir.ExternalTensor(location, offset, nbytes, dtype, shape=ir.Shape(list(shape)),
                                          name=value.name, base_dir=str(base))


def write(graph_model: ir.Model, entries: list[Entry], source: TensorSource, path: Path,
          progress: Progress | None = None, block_bytes: int = BLOCK_BYTES) -> dict:
    """Stream every entry's bytes into `<path>.data`, save the graph proto to `path`.

    Returns {"data_sha256", "data_bytes", "tensors"}. Nothing but one block of rows is held.
    `progress(name, done, total)` counts source parameters.
    """
    data_name = path.name + ".data"
    data = _DataFile(path.parent / data_name)
    def work(e: Entry) -> int:  # parameters read: what the time goes with (bytes stored do not, when quantized)
        return source.info(e.source).numel if e.source is not None else e.constant.size

    total = sum(work(e) for e in entries)
    done = 0
    try:
        for e in entries:
            nbytes = int(e.dtype.itemsize) * int(np.prod(e.shape, dtype=np.int64))
            start = data.reserve(nbytes)
            if e.constant is not None:
                data.put(start, _cast(e.constant.reshape(e.shape), e.dtype))
            elif e.quant is not None:
                scales = _write_quantized(e, source, data, start, block_bytes)
                s_start = data.reserve(scales.nbytes)
                data.put(s_start, scales)
                _external(e.scales, data_name, path.parent, s_start, scales.nbytes, ir.DataType.FLOAT, scales.shape)
                graph_model.graph.register_initializer(e.scales)
                del scales
            else:
                _write_float(e, source, data, start, block_bytes)
            _external(e.value, data_name, path.parent, start, nbytes, e.dtype, e.shape)
            if e.value.name not in graph_model.graph.initializers:
                graph_model.graph.register_initializer(e.value)
            done += work(e)
            if progress is not None:
                progress(e.source or e.value.name, done, total)
    except BaseException:
        data.close()
        raise
    sha = data.close()
    proto = ir.serde.serialize_model(graph_model)
    onnx.save(proto, str(path))
    return {"data_sha256": sha, "data_bytes": data.end, "tensors": len(entries), "parameters": total}


def workers() -> int:
    """Threads that convert blocks: the cores this process may use (reads, numpy and ONNX
    Runtime's quantization kernel release the GIL)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def pipelined(fn: Callable, items: Iterable, n: int | None = None) -> Iterator:
    """fn over items on n threads, results in order, at most n items in flight (bounded memory)."""
    n = n or workers()
    if n == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(n) as ex:
        pending: deque = deque()
        for item in items:
            pending.append(ex.submit(fn, item))
            if len(pending) >= n:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _blocks(info: TensorInfo, block_bytes: int):
    if len(info.shape) < 2:
        return [None]
    return list(row_blocks(info, block_bytes))


def _read_checked(source: TensorSource, name: str, info: TensorInfo, rows) -> np.ndarray:
    x = source.read(name, rows)
    if not np.isfinite(x).all():
        raise MtadError(f"{info.file}: tensor {name} holds NaN or infinite values")
    return x


def _write_float(e: Entry, source: TensorSource, data: _DataFile, start: int, block_bytes: int) -> None:
    info = source.info(e.source)
    size = int(e.dtype.itemsize)

    def convert(rows):
        y = _cast(_read_checked(source, e.source, info, rows), e.dtype)
        return rows, (np.ascontiguousarray(y.T) if e.transpose else y)

    for rows, y in pipelined(convert, _blocks(info, block_bytes)):
        if not e.transpose:
            lo = 0 if rows is None else rows.start
            row_bytes = y.nbytes // max(y.shape[0], 1) if y.ndim else y.nbytes
            data.put(start + lo * row_bytes, y)
        else:  # rows n0..n1 of W [N, K] are columns n0..n1 of every row k of Wᵀ [K, N]
            n_all = e.shape[1]
            for k in range(y.shape[0]):
                data.put(start + (k * n_all + rows.start) * size, y[k])
        del y


def _write_quantized(e: Entry, source: TensorSource, data: _DataFile, start: int, block_bytes: int) -> np.ndarray:
    info = source.info(e.source)
    bits, block = e.quant["bits"], e.quant["block_size"]
    row_bytes = int(np.prod(e.shape[1:], dtype=np.int64))
    scales = np.empty(_scales_shape(e), dtype=np.float32)

    def convert(rows):
        return rows, *quantize_rows(_read_checked(source, e.source, info, rows), bits, block)

    for rows, packed, sc in pipelined(convert, _blocks(info, block_bytes)):
        data.put(start + rows.start * row_bytes, packed)
        scales[rows] = sc
    return scales
