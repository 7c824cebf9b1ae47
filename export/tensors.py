"""Checkpoint weights one tensor at a time, as float32 numpy, from a memory map.

The streaming export never holds a model: it asks a `TensorSource` for one tensor (or a block of
its rows), converts it, writes it and drops it. Two sources implement the protocol: a Hugging Face
folder of safetensors (one file, or shards listed in `model.safetensors.index.json`) read here with
positioned reads, and a GGUF file (`gguf_source`), dequantized one tensor at a time.

The safetensors layout is simple enough to read without a framework: 8 bytes of header length,
a JSON header mapping each name to dtype, shape and byte range, then the raw little-endian data.
Reading it ourselves lets a bf16 tensor become float32 block by block (numpy has no bfloat16),
and lets every fault — a shard the index names but the folder lacks, a file cut short, a
tensor whose byte range does not match its shape — be reported with the file and tensor name.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from mtad_trt.errors import MtadError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# safetensors dtype -> (numpy dtype of the stored bits, bytes per element)
_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),  # the top half of a float32: widened in `_to_float32`
    "F64": (np.dtype("<f8"), 8),
}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # the stored dtype as the source names it ("BF16", "F32", "Q4_K", ...)
    file: str  # where it lives, for error messages

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


class TensorSource(Protocol):
    """What the streaming export reads: names, shapes, and float32 blocks of rows."""

    path: Path

    def names(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The tensor (or rows `rows` of its first axis) as a new float32 array."""
        ...

    def close(self) -> None: ...


def row_blocks(info: TensorInfo, max_bytes: int) -> Iterator[slice]:
    """Row ranges of a tensor whose float32 copy stays under `max_bytes` (at least one row each)."""
    row_bytes = 4 * (info.numel // max(info.rows, 1))
    step = max(1, max_bytes // max(row_bytes, 1))
    for lo in range(0, info.rows, step):
        yield slice(lo, min(lo + step, info.rows))


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


class _SafetensorsFile:
    """One .safetensors file: its header, checked against the file's size, and a memory map."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fh = open(path, "rb")
        except OSError as e:
            raise MtadError(f"cannot open {path}: {e.strerror}") from None
        size = path.stat().st_size
        head = self._fh.read(8)
        if len(head) < 8:
            raise MtadError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise MtadError(f"{path}: not a safetensors file (header length {n} past the end of the file)")
        try:
            header = json.loads(self._fh.read(n))
        except ValueError as e:
            raise MtadError(f"{path}: not a safetensors file (bad JSON header: {e})") from None
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            dtype, shape, (lo, hi) = e["dtype"], tuple(int(x) for x in e["shape"]), e["data_offsets"]
            if dtype not in _DTYPES:
                raise MtadError(f"{path}: tensor {name} has dtype {dtype}; the export reads F32, F16, BF16, F64")
            want = _DTYPES[dtype][1] * int(np.prod(shape, dtype=np.int64))
            if hi - lo != want:
                raise MtadError(f"{path}: tensor {name}: {hi - lo} bytes stored for shape {list(shape)} {dtype} "
                                f"({want} expected)")
            if self.base + hi > size:
                raise MtadError(f"{path}: truncated: tensor {name} ends at byte {self.base + hi}, "
                                f"the file has {size}")
            self.entries[name] = (dtype, shape, lo, hi)

    def read(self, name: str, rows: slice | None) -> np.ndarray:
        """Positioned reads, not a memory map: mapped pages would count in the process's resident
        memory until unmapped, so reading a whole checkpoint would look like holding it."""
        dtype, shape, lo, hi = self.entries[name]
        np_dtype, width = _DTYPES[dtype]
        if rows is not None and shape:
            start, stop, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError("row blocks must be contiguous")
            row_bytes = (hi - lo) // max(shape[0], 1)
            lo, hi, shape = lo + start * row_bytes, lo + stop * row_bytes, (stop - start, *shape[1:])
        buf = bytearray(hi - lo)
        view, offset = memoryview(buf), self.base + lo
        while view:
            n = os.preadv(self._fh.fileno(), [view], offset)
            if n <= 0:
                raise MtadError(f"{self.path}: truncated while reading tensor {name}")
            view, offset = view[n:], offset + n
        raw = np.frombuffer(buf, dtype=np_dtype).reshape(shape)
        return _to_float32(raw, dtype)

    def close(self) -> None:
        self._fh.close()


class SafetensorsSource:
    """A Hugging Face folder's weights: `model.safetensors`, or the shards its index names."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder)
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise MtadError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
            shards = sorted(set(weight_map.values()))
        elif (self.path / SINGLE).is_file():
            weight_map, shards = None, [SINGLE]
        else:
            found = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not found:
                raise MtadError(f"{self.path}: no {SINGLE} and no {INDEX} (the export reads safetensors weights)")
            weight_map, shards = None, found
        self._files: dict[str, _SafetensorsFile] = {}
        try:
            for shard in shards:
                p = self.path / shard
                if not p.is_file():
                    raise MtadError(f"{index}: names shard {shard}, which is not in {self.path}")
                self._files[shard] = _SafetensorsFile(p)
        except BaseException:
            self.close()
            raise
        self._where: dict[str, str] = {}
        for shard, f in self._files.items():
            for name in f.entries:
                self._where[name] = shard
        if weight_map is not None:
            for name, shard in weight_map.items():
                if self._where.get(name) != shard:
                    self.close()
                    raise MtadError(f"{index}: names tensor {name} in {shard}, which does not hold it")

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        shard = self._where.get(name)
        if shard is None:
            raise MtadError(f"{self.path}: the checkpoint has no tensor {name}")
        dtype, shape, _, _ = self._files[shard].entries[name]
        return TensorInfo(shape, dtype, str(self.path / shard))

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        self.info(name)
        return self._files[self._where[name]].read(name, rows)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even, as torch does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))
    return (rounded >> 16).astype(np.uint16)


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], str]], produce, metadata=None) -> None:
    """Write a safetensors file one tensor at a time: `tensors` lists (name, shape, dtype) in file
    order and `produce(name)` returns that tensor as float32, called once per tensor and dropped
    after writing (the header is computed from the shapes up front). dtype: F32, F16 or BF16."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in tensors:
        n = _DTYPES[dtype][1] * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in tensors:
            x = np.asarray(produce(name), dtype=np.float32)
            if tuple(x.shape) != tuple(shape):
                raise MtadError(f"{path}: tensor {name} has shape {list(x.shape)}, header says {list(shape)}")
            bits = to_bf16_bits(x) if dtype == "BF16" else x.astype(_DTYPES[dtype][0], copy=False)
            f.write(memoryview(np.ascontiguousarray(bits)).cast("B"))  # no bytes copy of the tensor
            del x, bits


class ModuleSource:
    """A loaded torch model's own parameters as a source (the torch backend's tests, gpu_check):
    the same streaming path then exports a model that is already in memory."""

    def __init__(self, model) -> None:
        self.path = Path(f"<{type(model).__name__} in memory>")
        self._tensors = dict(model.state_dict(keep_vars=False))

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        if name not in self._tensors:
            raise MtadError(f"{self.path}: no tensor {name}")
        t = self._tensors[name]
        return TensorInfo(tuple(t.shape), str(t.dtype), str(self.path))

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        t = self._tensors[name]
        t = t if rows is None else t[rows]
        return t.detach().float().cpu().numpy().copy()

    def close(self) -> None:
        self._tensors = {}


def open_source(kind: str, path: Path) -> TensorSource:
    """The tensor source of a checkpoint: kind "hf" (a folder) or "gguf" (a file)."""
    if kind == "gguf":
        from mtad_trt.export.gguf_source import GGUFSource

        return GGUFSource(path)
    return SafetensorsSource(path)
