"""Static-slot KV cache (docs/graph-contract.md §3), on the host (numpy) or a torch device, one design.

Memory is allocated once, zeroed, at full capacity (on the host also committed then:
`committed_zeros`). Each cache tensor is one flat buffer; the
current S bucket is the *prefix* of that buffer viewed as [B, Hkv, S, D], so the view handed to
the graph is contiguous (IO binding and TensorRT addresses need that), sits at the same address
for every bucket (CUDA graphs need that) and costs only the bucket's bytes of attention work.

One re-layout rule (growing to a larger bucket moves each row to its new stride, once per bucket
change, never per step) and one reset policy serve both kinds:

- **only rows that hold data move.** Rows enter the cache only through `keep`, `move` and `write`,
  so the cache knows the highest batch row written since the last reset (`live`); growing or
  shrinking re-lays out rows [0, live) alone. With 16 rows allocated and 5 in use (default pair,
  2-core VM), the iteration in which a long prompt grew the cache to 2,048 slots took 2.47 s against
  ~0.44 s around it; moving only the 5 live rows, the growth itself took 758 ms (page faults on the
  new region, see `committed_zeros`), and with committed pages 24 ms.
- **nothing is zeroed after allocation.** Every element of a buffer is zero or a value some step
  wrote (re-layouts move whole elements), so it is finite, and the mask gives every slot a row has
  not committed weight exactly 0. Clearing 100+ MB per request or per growth would buy nothing.
"""

from __future__ import annotations

import abc
import mmap
from typing import Any

import numpy as np

from mtad_trt.contract import NP_DTYPES, ModelSpec
from mtad_trt.errors import CapacityError

SMALLEST_BUCKET = 128
ALIGN_BYTES = 256  # TensorRT refuses a tensor address that is not a multiple of 256 (set_tensor_address)


def aligned_zeros(shape: tuple[int, ...], dtype: Any, device: Any, align: int = ALIGN_BYTES) -> Any:
    """A zeroed contiguous torch tensor whose address is a multiple of `align` bytes.

    torch's CUDA allocator already returns 512-byte aligned blocks; its CPU allocator only 64, so
    without this the CPU harness could not check the alignment rule TensorRT enforces.
    """
    import torch

    n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.zeros(n + align, dtype=torch.uint8, device=device)
    off = -raw.data_ptr() % align
    return raw[off : off + n].view(dtype).view(shape)


def committed_zeros(count: int, n: int, dtype: Any) -> list[np.ndarray]:
    """`count` zeroed flat arrays of `n` elements, their pages committed now (one anonymous map
    with MAP_POPULATE on Linux; plain np.zeros elsewhere).

    Lazily committed pages are paid for when first written: a long prompt growing 16 rows' caches
    to the 2,048-slot bucket took ~0.3 GB of page faults (0.75 s on a 2-core VM) in the middle of a
    step every running stream waits for. Committed at load, the same memory costs ~0.3 s per GiB
    once, and the server's resident memory is what it will be under load, from the start.
    """
    itemsize = np.dtype(dtype).itemsize
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if not populate or not n or not count:
        return [np.zeros(n, dtype) for _ in range(count)]
    region = mmap.mmap(-1, count * n * itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    return [np.frombuffer(region, dtype, count=n, offset=i * n * itemsize) for i in range(count)]


def bucket_sizes(max_seq_len: int, smallest: int = SMALLEST_BUCKET) -> list[int]:
    """S buckets: powers of two from `smallest`, capped by (and always including) max_seq_len.

    Attention cost grows with S (the whole bucket is read every step), so a short sequence
    should not pay for the engine's full capacity; CUDA graphs are keyed by bucket.
    """
    sizes, s = [], min(smallest, max_seq_len)
    while s < max_seq_len:
        sizes.append(s)
        s *= 2
    sizes.append(max_seq_len)
    return sizes


def next_bucket(buckets: list[int], size: int, slots: int, capacity: int) -> int | None:
    """The bucket to grow to so `slots` fit, or None when the current `size` already holds them."""
    if slots <= size:
        return None
    check_capacity(slots, capacity)
    return next(b for b in buckets if b >= slots)


def check_capacity(slots: int, capacity: int) -> None:
    """The one capacity rule: a sequence may use at most the engine's max_seq_len KV slots."""
    if slots > capacity:
        raise CapacityError(f"sequence needs {slots} KV slots; the engine's capacity is {capacity}")


class SlotCache(abc.ABC):
    """What both caches share: buckets, views, growth and reset. Subclasses allocate and copy.

    `flat` holds one flat buffer per cache tensor (2 per layer, graph order); `views[i]` is tensor
    i's current bucket as [B, Hkv, S, D].
    """

    flat: list[Any]
    views: list[Any]

    def __init__(self, spec: ModelSpec, batch: int, smallest_bucket: int = SMALLEST_BUCKET) -> None:
        self.spec, self.batch = spec, batch
        self.buckets = bucket_sizes(spec.max_seq_len, smallest_bucket)
        self.rows = batch * spec.num_kv_heads  # rows of head_dim-wide vectors per slot column
        self.size = self.buckets[0]
        self.live = 0  # batch rows [0, live) may hold data (written since the last reset)
        self.flat = self._alloc(self.rows * spec.max_seq_len * spec.head_dim)
        self._make_views()

    @property
    def nbytes(self) -> int:
        return sum(int(f.nbytes) for f in self.flat)

    def _make_views(self) -> None:
        s = self.spec
        n = self.rows * self.size * s.head_dim
        shape = (self.batch, s.num_kv_heads, self.size, s.head_dim)
        self.views = [f[:n].reshape(shape) for f in self.flat]

    def reserve(self, slots: int) -> int:
        new = next_bucket(self.buckets, self.size, slots, self.spec.max_seq_len)
        if new is None:
            return self.size
        self._relayout(self.size, new, range(self.live * self.spec.num_kv_heads - 1, 0, -1))
        self.size = new
        self._make_views()
        return new

    def shrink(self, slots: int) -> int:
        """Move down to the smallest bucket holding `slots`, when that is smaller than the current
        one, keeping slots [0, that bucket) of every live row; returns the bucket. A long prompt grows
        the bucket for every row, and attention reads the whole bucket each step: shrinking once it
        has left keeps the other rows' steps from paying for it until the server is idle."""
        new = next((b for b in self.buckets if b >= max(slots, 1)), self.size)
        if new >= self.size:
            return self.size
        self._relayout(self.size, new, range(1, self.live * self.spec.num_kv_heads))
        self.size = new
        self._make_views()
        return new

    def _relayout(self, old: int, new: int, order: range) -> None:
        """Move slots [0, min(old, new)) of each flat row from stride `old` to stride `new`, in
        place, one head-row at a time (a temporary of one row, not of the cache). Growing goes from
        the last row down and shrinking from the first up, so no row is overwritten before it has
        moved; row 0 never moves (`order` leaves it out)."""
        d, keep = self.spec.head_dim, min(old, new) * self.spec.head_dim
        for f in self.flat:
            for r in order:
                f[r * new * d : r * new * d + keep] = self._clone(f[r * old * d : r * old * d + keep])

    def read(self, row: int, start: int, count: int) -> Any:
        """A host copy of slots [start, start + count) of batch row `row`: [2L, Hkv, count, D]
        (the prefix cache's block format; independent of later writes)."""
        return self._to_host([v[row, :, start : start + count, :] for v in self.views])

    def write(self, row: int, start: int, block: Any) -> None:
        """Copy a `read` block into slots [start, start + count) of batch row `row`."""
        count = block.shape[2]
        self.live = max(self.live, row + 1)
        for i, v in enumerate(self.views):
            v[row, :, start : start + count, :] = self._from_host(block[i])

    def reset(self) -> None:
        """Forget every sequence: back to the smallest bucket (no zeroing; module docstring)."""
        self.size, self.live = self.buckets[0], 0
        self._make_views()

    @abc.abstractmethod
    def _alloc(self, n: int) -> list[Any]:
        """One zeroed flat buffer of n elements per cache tensor."""

    @abc.abstractmethod
    def _clone(self, a: Any) -> Any:
        """A copy of `a` that no later write to the cache can change."""

    @abc.abstractmethod
    def _to_host(self, parts: list[Any]) -> Any:
        """The parts stacked into one host array (numpy; a CPU torch tensor for bfloat16)."""

    @abc.abstractmethod
    def _from_host(self, a: Any) -> Any:
        """A host array as something assignable into a view."""


class HostKVCache(SlotCache):
    """numpy buffers, for the CPU backends."""

    def __init__(self, spec: ModelSpec, batch: int = 1, smallest_bucket: int = SMALLEST_BUCKET) -> None:
        if spec.dtype not in NP_DTYPES:
            raise CapacityError(f"the host KV cache supports {sorted(NP_DTYPES)}, not {spec.dtype}")
        super().__init__(spec, batch, smallest_bucket)

    def _alloc(self, n: int) -> list[np.ndarray]:
        return committed_zeros(2 * self.spec.num_layers, n, NP_DTYPES[self.spec.dtype])

    def _clone(self, a: np.ndarray) -> np.ndarray:
        return a.copy()

    def _to_host(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.stack(parts)

    def _from_host(self, a: np.ndarray) -> np.ndarray:
        return a

    def keep(self, new_kv: list[np.ndarray], row: int, src: np.ndarray, dst: np.ndarray, new_row: int | None = None) -> None:
        """Copy new K/V rows `src` of the step's batch row `new_row` (default `row`) into slots
        `dst` of cache row `row` (they differ when the step ran on a window of rows)."""
        if len(src) == 0:
            return
        self.live = max(self.live, row + 1)
        n = row if new_row is None else new_row
        if len(src) == 1:
            s, t = int(src[0]), int(dst[0])
            for cache, new in zip(self.views, new_kv, strict=False):
                cache[row, :, t, :] = new[n, :, s, :]
            return
        for cache, new in zip(self.views, new_kv, strict=False):
            cache[row, :, dst, :] = new[n, :, src, :]

    def move(self, row: int, src: np.ndarray, dst: np.ndarray) -> None:
        if len(src) == 0:
            return
        self.live = max(self.live, row + 1)
        for cache in self.views:
            cache[row, :, dst, :] = cache[row, :, src, :]  # fancy-indexed read copies first: overlap-safe


class TorchKVCache(SlotCache):
    """torch tensors on a device, for the torch and TensorRT backends.

    One [2L, B*Hkv*S_max*D] tensor; `all_layers` views every layer's bucket at once, so `move` is
    one gather + one scatter however many layers there are. Its rows start 256 bytes apart or a
    multiple of that (the row stride is padded), so every view can be bound as a TensorRT address.
    """

    def __init__(self, spec: ModelSpec, batch: int, device: Any, dtype: Any,
                 smallest_bucket: int = SMALLEST_BUCKET) -> None:
        import torch

        self._torch, self.device, self.dtype = torch, torch.device(device), dtype
        super().__init__(spec, batch, smallest_bucket)

    def _alloc(self, n: int) -> list[Any]:
        per = max(1, ALIGN_BYTES // self._torch.empty((), dtype=self.dtype).element_size())
        stride = -(-n // per) * per  # elements per row, rounded up to whole 256-byte blocks
        self._all = aligned_zeros((2 * self.spec.num_layers, stride), self.dtype, self.device)[:, :n]
        return list(self._all.unbind(0))

    def _clone(self, a: Any) -> Any:
        return a.clone()

    def _to_host(self, parts: list[Any]) -> Any:
        return self._torch.stack(parts).to("cpu")

    def _from_host(self, a: Any) -> Any:
        return a.to(self.device, non_blocking=False)

    def _relayout(self, old: int, new: int, order: range) -> None:
        """As `SlotCache._relayout`, each head-row moved across every layer at once (`_all`): on a
        GPU, two kernel launches per head-row rather than two per head-row and tensor."""
        d, keep = self.spec.head_dim, min(old, new) * self.spec.head_dim
        with self._torch.no_grad():
            for r in order:
                self._all[:, r * new * d : r * new * d + keep] = self._clone(self._all[:, r * old * d : r * old * d + keep])

    def _make_views(self) -> None:
        super()._make_views()
        s = self.spec
        n = self.rows * self.size * s.head_dim
        self.all_layers = self._all[:, :n].view(2 * s.num_layers, self.batch, s.num_kv_heads, self.size, s.head_dim)

    def _index(self, idx: np.ndarray) -> Any:
        return self._torch.as_tensor(np.asarray(idx, dtype=np.int64)).to(self.device, non_blocking=True)

    def keep(self, new_kv: list[Any], row: int, src: np.ndarray, dst: np.ndarray, new_row: int | None = None) -> None:
        if len(src) == 0:
            return
        self.live = max(self.live, row + 1)
        n = row if new_row is None else new_row
        s, d = self._index(src), self._index(dst)
        with self._torch.no_grad():
            for cache, new in zip(self.views, new_kv, strict=True):
                cache[row].index_copy_(1, d, new[n].index_select(1, s))

    def move(self, row: int, src: np.ndarray, dst: np.ndarray) -> None:
        if len(src) == 0:
            return
        self.live = max(self.live, row + 1)
        layers = self.all_layers[:, row]  # [2L, Hkv, S, D]
        with self._torch.no_grad():  # gather first: overlap-safe
            layers.index_copy_(2, self._index(dst), layers.index_select(2, self._index(src)))
