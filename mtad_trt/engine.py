"""The one interface every backend implements (engine-contract §2-§4).

A backend runs the exported graph once per `step` and owns the model's static-slot KV cache.
It knows nothing of MTAD: decoders decide which tokens to feed, what each may attend to, and
which of the step's new key/value rows to keep (`keep`) or move (`move`).

Step I/O is numpy on the host for every backend: logits come back as float32 numpy (the decoders'
sampling is host-side), and inputs are small int/bool arrays. Device backends copy them into
their own static device buffers (which is also what makes CUDA-graph replay possible).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mtad_trt.errors import CapacityError
from mtad_trt.manifest import ModelSpec


@dataclass
class StepInputs:
    """One call of the graph. B rows, T new tokens, S cache slots (the current bucket), K logits rows."""

    input_ids: np.ndarray  # int64 [B, T]
    position_ids: np.ndarray  # int64 [B, T]
    attention_mask: np.ndarray  # bool [B, 1, T, S + T]; True = may attend
    logits_index: np.ndarray  # int64 [B, K]: which of the T positions need logits


@runtime_checkable
class Engine(Protocol):
    """A model behind the graph contract, with its KV cache.

    Lifecycle: `reserve(n)` before a step that needs n cache slots (grows the S bucket; never
    shrinks mid-sequence), `step(...)`, then `keep(...)` for the rows worth caching. The logits
    array returned by `step` is a view of a reused buffer: valid until the next `step`.
    """

    spec: ModelSpec
    name: str  # "ort-cpu", "torch-cuda", "trt", ...

    @property
    def capacity(self) -> int:
        """Slots in the current S bucket (the S of the next step's attention mask)."""
        ...

    def reserve(self, slots: int) -> int:
        """Make the cache hold at least `slots` slots; returns the (possibly larger) bucket size."""
        ...

    def reset(self) -> None:
        """Forget every sequence (shrinks back to the smallest bucket)."""
        ...

    def step(self, inputs: StepInputs) -> np.ndarray:
        """Run the graph; return float32 logits [B, K, V]. New K/V rows wait for `keep`."""
        ...

    def keep(self, row: int, src: np.ndarray, dst: np.ndarray) -> None:
        """Write the last step's new K/V rows `src` (indices into T) of batch row `row` into cache slots `dst`."""
        ...

    def move(self, row: int, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy cache slots `src` to slots `dst` within batch row `row` (compaction after acceptance)."""
        ...

    def close(self) -> None:
        """Release sessions and buffers."""
        ...


def bucket_sizes(max_seq_len: int, smallest: int = 128) -> list[int]:
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
    if slots > capacity:
        raise CapacityError(f"needs {slots} KV slots; the engine's capacity is {capacity}")
    return next(b for b in buckets if b >= slots)


class SlotCacheEngine:
    """The cache half of `Engine`, shared by every backend: delegate to a slot cache object.

    A backend sets `self.cache` (HostKVCache or TorchKVCache) and `self._new_kv` (the last step's
    new K/V rows); what differs between backends is only `step`.
    """

    cache: Any
    _new_kv: Any

    @property
    def capacity(self) -> int:
        return self.cache.size

    def reserve(self, slots: int) -> int:
        return self.cache.reserve(slots)

    def reset(self) -> None:
        self.cache.reset()

    def keep(self, row: int, src: np.ndarray, dst: np.ndarray) -> None:
        self.cache.keep(self._new_kv, row, src, dst)

    def move(self, row: int, src: np.ndarray, dst: np.ndarray) -> None:
        self.cache.move(row, src, dst)
