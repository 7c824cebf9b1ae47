"""Static-slot KV cache on the host (numpy), shared by the CPU backends.

Memory is allocated once, zeroed, at full capacity (engine-contract §3). Each cache tensor is
one flat buffer; the current S bucket is the *prefix* of that buffer viewed as [B, Hkv, S, D],
so the view handed to the graph is contiguous (IO binding needs that) and costs only the
bucket's bytes of attention work. Growing to a larger bucket re-lays the rows out in place,
once per bucket change, never per step.
"""

from __future__ import annotations

import numpy as np

from mtad_trt.engine import bucket_sizes, next_bucket
from mtad_trt.errors import CapacityError
from mtad_trt.manifest import ModelSpec

NP_DTYPES = {"float32": np.float32, "float16": np.float16}


class HostKVCache:
    def __init__(self, spec: ModelSpec, batch: int = 1, smallest_bucket: int = 128) -> None:
        if spec.dtype not in NP_DTYPES:
            raise CapacityError(f"the host KV cache supports {sorted(NP_DTYPES)}, not {spec.dtype}")
        self.spec, self.batch = spec, batch
        self.buckets = bucket_sizes(spec.max_seq_len, smallest_bucket)
        per = batch * spec.num_kv_heads * spec.max_seq_len * spec.head_dim
        self._flat = [np.zeros(per, NP_DTYPES[spec.dtype]) for _ in range(2 * spec.num_layers)]
        self.size = self.buckets[0]
        self.views: list[np.ndarray] = []
        self._make_views()

    def _make_views(self) -> None:
        s = self.spec
        n = self.batch * s.num_kv_heads * self.size * s.head_dim
        shape = (self.batch, s.num_kv_heads, self.size, s.head_dim)
        self.views = [f[:n].reshape(shape) for f in self._flat]

    def reserve(self, slots: int) -> int:
        new = next_bucket(self.buckets, self.size, slots, self.spec.max_seq_len)
        if new is None:
            return self.size
        old, rows, d = self.size, self.batch * self.spec.num_kv_heads, self.spec.head_dim
        for f in self._flat:
            # Row r moves from [r*old*d, ...) to [r*new*d, ...); going from the last row down never
            # overwrites a row before it is moved (new > old).
            for r in range(rows - 1, 0, -1):
                f[r * new * d : r * new * d + old * d] = f[r * old * d : (r + 1) * old * d]
                f[r * new * d + old * d : (r + 1) * new * d] = 0
            f[old * d : new * d] = 0
        self.size = new
        self._make_views()
        return new

    def reset(self) -> None:
        """Forget every sequence: back to the smallest bucket, no zeroing.

        Stale slots hold finite values written by the model (buffers start zeroed and only model
        outputs are ever written), and the mask gives them weight exactly 0, so clearing 100+ MB
        per request would buy nothing.
        """
        self.size = self.buckets[0]
        self._make_views()

    def keep(self, new_kv: list[np.ndarray], row: int, src: np.ndarray, dst: np.ndarray) -> None:
        if len(src) == 0:
            return
        if len(src) == 1:
            s, t = int(src[0]), int(dst[0])
            for cache, new in zip(self.views, new_kv, strict=False):
                cache[row, :, t, :] = new[row, :, s, :]
            return
        for cache, new in zip(self.views, new_kv, strict=False):
            cache[row, :, dst, :] = new[row, :, src, :]

    def move(self, row: int, src: np.ndarray, dst: np.ndarray) -> None:
        if len(src) == 0:
            return
        for cache in self.views:
            cache[row, :, dst, :] = cache[row, :, src, :]  # fancy-indexed read copies first: overlap-safe
