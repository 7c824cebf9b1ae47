"""A GGUF file as a `TensorSource`: Hugging Face names, float32 values, one tensor at a time.

transformers loads a GGUF by dequantizing *every* tensor into a dict before building the model
(`load_gguf_checkpoint`), so its peak is the whole float model. This source gives the same values
under the same names without that: the file is a memory map, and a tensor is dequantized (with
`gguf.quants.dequantize`) only when it is read, then handed over and forgotten.

"The same values" is kept by reusing transformers' own per-tensor machinery instead of copying it:
the config dict of `load_gguf_checkpoint`, the name map `get_gguf_hf_weights_map` builds from a
model instantiated on the meta device (no memory), and the architecture's `TENSOR_PROCESSORS`
entry (llama/mistral q/k reverse permutation, Gemma's `norm - 1`, ...), applied to each tensor
exactly as the loader applies it. The tests compare every tensor with transformers' own GGUF load.

Only one-to-one processing is streamed: processors that merge several GGUF tensors into one
parameter or split one into many (the MoE ones) are refused with a one-line error, as are the
architectures transformers loads through its newer packed path (`integrations/gguf`).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtad_trt.errors import MtadError
from mtad_trt.export.tensors import TensorInfo

_CHUNK_BYTES = 64 << 20
"""float32 output dequantized per call to gguf: gguf itself would hold its per-group outputs and
the concatenated result at once (twice the tensor)."""


@dataclass(frozen=True)
class _Entry:
    gguf_name: str
    qtype: object  # gguf.GGMLQuantizationType
    offset: int  # of the data in the file
    dtype: np.dtype  # of the stored items, and their array shape, as GGUFReader lays them out:
    stored: tuple[int, ...]  # values for F32/F16, bytes (rows, row bytes) for block types
    cols: int  # values per stored row (GGUF's first dimension)
    shape: tuple[int, ...]  # the Hugging Face parameter's shape


class GGUFSource:
    """The tensors transformers would load from a GGUF, under their Hugging Face state-dict names.

    `config` is the transformers config of that model (what `AutoConfig.from_pretrained(folder,
    gguf_file=...)` gives), `architecture` its causal-LM class name, `missing` the parameters the
    file lacks. A tied LM head is not listed: with `config.tie_word_embeddings` the GGUF stores no
    `output.weight` and transformers re-ties `lm_head.weight` to `model.embed_tokens.weight`.

    The map's pages a read touched are given back afterwards (`madvise(MADV_DONTNEED)`; they stay
    in the page cache): otherwise every tensor read would stay in this process's RSS and the
    resident size would grow to the whole file.
    """

    def __init__(self, path: Path) -> None:
        import torch
        from gguf import GGUFReader
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
        )

        self.path = Path(path)
        self._mm: mmap.mmap | None = None
        self._entries: dict[str, _Entry] = {}
        if not self.path.is_file():
            raise MtadError(f"{self.path}: no such GGUF file")
        try:
            reader = GGUFReader(self.path)
            arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        except (ValueError, KeyError, OSError) as e:
            raise MtadError(f"{self.path}: not a GGUF file transformers can read ({e})") from None
        self._refuse_packed_path(arch)
        # Only where each tensor lies is kept: the reader's metadata (a 151k-token vocabulary is
        # ~0.5 GB of small numpy arrays) goes with it.
        stored = {
            t.name: (t.tensor_type, t.data_offset, t.data.dtype, t.data.shape, tuple(int(d) for d in reversed(t.shape)))
            for t in reader.tensors
        }
        del reader
        try:
            raw_config = load_gguf_checkpoint(str(self.path), return_tensors=False)["config"]
            self.config = AutoConfig.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
            # The processor sees the loader's raw config dict, as in load_gguf_checkpoint (defaults
            # the config class fills in would change what, e.g., the llama processor does).
            self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=raw_config)
            with torch.device("meta"):  # shapes and names only: no memory
                model = AutoModelForCausalLM.from_config(self.config)
            self._map = get_gguf_hf_weights_map(model, self._processor)
        except (ValueError, KeyError, NotImplementedError) as e:
            raise MtadError(f"{self.path}: transformers cannot load this GGUF ({e})") from None
        self.architecture = type(model).__name__
        hf_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        del model

        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        for gguf_name, (qtype, offset, dtype, shape, gguf_shape) in stored.items():
            hf = self._map.get(gguf_name)
            if hf is None:  # transformers skips it too (e.g. llama3's rope_freqs)
                continue
            if int(np.prod(gguf_shape)) != int(np.prod(hf_shapes[hf])):
                raise MtadError(f"{self.path}: tensor {gguf_name} has shape {list(gguf_shape)}; {hf} of "
                                f"{self.architecture} built from its config needs {list(hf_shapes[hf])}")
            e = _Entry(gguf_name, qtype, offset, dtype, shape, gguf_shape[-1] if gguf_shape else 1, hf_shapes[hf])
            try:  # an unsupported type fails here, at open, rather than halfway through an export
                data = self._data(e)
                self._dequantize(e, data[:1] if data.ndim > 1 else data)
            finally:
                self._release(e)
            self._entries[hf] = e
        order = list(hf_shapes)  # state-dict order: embedding, layers, norm, head
        self._names = sorted(self._entries, key=order.index)
        self.missing = [k for k in hf_shapes if k not in self._entries and k not in tied]

    def _refuse_packed_path(self, arch: str) -> None:
        """transformers loads a few architectures (qwen35, lfm2, ...) with its own newer transforms
        instead of TENSOR_PROCESSORS; reading those through the legacy machinery could differ."""
        try:
            from transformers.integrations.gguf.utils import is_gguf_arch_supported
        except ImportError:  # a transformers without the packed path loads everything the legacy way
            return
        if is_gguf_arch_supported(arch):
            raise MtadError(f"{self.path}: transformers loads {arch} GGUFs through its packed-weights path, "
                            f"which this streaming source does not reproduce")

    def names(self) -> list[str]:
        return list(self._names)

    def info(self, name: str) -> TensorInfo:
        e = self._entry(name)
        return TensorInfo(e.shape, e.qtype.name, str(self.path))

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Dequantize and process one tensor as transformers does; a new float32 array.

        With `rows`, only those rows are dequantized when the processor leaves the tensor's rows
        whole (it does nothing, or only reorders them, as llama's q/k un-permutation): dequantizing
        is row-local (a block never spans two rows) and a reorder moves values without arithmetic,
        so the result is bit-identical to slicing the full tensor. Otherwise the full tensor is
        processed and sliced.
        """
        e = self._entry(name)
        try:
            data = self._data(e)
            if rows is not None and (order := self._row_order(e)) is not None:
                src = order[rows]
                if len(src) and np.array_equal(src, np.arange(src[0], src[0] + len(src))):
                    raw = data[src[0] : src[0] + len(src)]  # a plain slice of the map
                else:
                    raw = data[src]  # gathers just these rows' bytes
                w = self._dequantize(e, raw).reshape((len(src), *e.shape[1:]))
            else:
                w = self._process(e, self._dequantize(e, data))
                if rows is not None:
                    w = w[rows]
            # Copied if it is a view of the map (an F32 tensor nothing touched) or a slice of a
            # larger array, which the caller would otherwise keep alive with it.
            base = w if w.base is None else w.base
            if not (w.dtype == np.float32 and w.flags.c_contiguous and getattr(base, "nbytes", -1) == w.nbytes
                    and not np.may_share_memory(w, data)):
                w = np.array(w, dtype=np.float32)
            return w
        finally:
            self._release(e)

    def close(self) -> None:
        self._entries = {}
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a caller still holds a view; the map goes with it
                pass
            self._mm = None

    # ------------------------------------------------------------------------------------------

    def _entry(self, name: str) -> _Entry:
        e = self._entries.get(name)
        if e is None:
            raise MtadError(f"{self.path}: the GGUF has no tensor that transformers loads as {name}")
        return e

    def _data(self, e: _Entry) -> np.ndarray:
        """The tensor's stored items: a view of the map, nothing read yet."""
        count = int(np.prod(e.stored))
        return np.frombuffer(self._mm, dtype=e.dtype, count=count, offset=e.offset).reshape(e.stored)

    def _release(self, e: _Entry) -> None:
        """Drop the tensor's pages from this process's resident set (the page cache keeps them)."""
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        lo = e.offset // mmap.PAGESIZE * mmap.PAGESIZE
        hi = min(len(self._mm), e.offset + int(np.prod(e.stored)) * e.dtype.itemsize)
        self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def _dequantize(self, e: _Entry, raw: np.ndarray) -> np.ndarray:
        """`gguf.quants.dequantize`, a row block at a time into one float32 array."""
        from gguf.quants import dequantize

        try:
            if raw.dtype != np.uint8 or raw.ndim < 2:  # plain values (F32, F16) or a 1-D tensor
                return dequantize(raw, e.qtype)
            flat = raw.reshape(-1, raw.shape[-1])
            out = np.empty((flat.shape[0], e.cols), dtype=np.float32)
            step = max(1, _CHUNK_BYTES // (4 * e.cols))
            for lo in range(0, flat.shape[0], step):
                out[lo : lo + step] = dequantize(flat[lo : lo + step], e.qtype)
            return out.reshape((*raw.shape[:-1], e.cols))
        except NotImplementedError:
            raise MtadError(f"{self.path}: tensor {e.gguf_name} is stored as {e.qtype.name}, which gguf "
                            f"{_dist_version('gguf')} cannot dequantize") from None

    def _process(self, e: _Entry, weights: np.ndarray) -> np.ndarray:
        """The architecture's processor, called as load_gguf_checkpoint calls it."""
        result = self._processor.process(
            weights=weights, name=e.gguf_name, tensor_key_mapping=self._map, parsed_parameters={"tensors": {}}
        )
        if result.name != e.gguf_name:
            raise MtadError(f"{self.path}: transformers merges or splits tensor {e.gguf_name} "
                            f"({type(self._processor).__name__}); the streaming source reads one-to-one tensors")
        if tuple(result.weights.shape) != e.shape:  # transformers would report a mismatched key
            raise MtadError(f"{self.path}: tensor {e.gguf_name} dequantizes to shape {list(result.weights.shape)}, "
                            f"{self._map[e.gguf_name]} needs {list(e.shape)}")
        return result.weights

    def _row_order(self, e: _Entry) -> np.ndarray | None:
        """For each row of the processed tensor, the stored row it comes from; None if the processor
        does more than reorder rows. Found by processing a column of row numbers."""
        if len(e.shape) != 2 or len(e.stored) != 2 or (e.stored[0], e.cols) != e.shape:
            return None
        probe = np.arange(e.shape[0], dtype=np.float64).reshape(-1, 1)
        try:
            out = self._processor.process(weights=probe, name=e.gguf_name, tensor_key_mapping=self._map,
                                          parsed_parameters={"tensors": {}})
        except Exception:  # a processor that needs the real columns (fused qkv, transposes)
            return None
        w = np.asarray(out.weights)
        if out.name != e.gguf_name or w.shape != probe.shape:
            return None
        order = w[:, 0]
        if not np.array_equal(np.sort(order), probe[:, 0]):
            return None
        return order.astype(np.int64)


def _dist_version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"
