"""The one interface every backend implements: a model behind the graph contract, with its KV cache.

A runner runs the exported graph once per `step` and owns the model's static-slot KV cache. It
knows nothing of MTAD: decoders decide which tokens to feed, what each may attend to, and which
of the step's new key/value rows to keep (`keep`) or move (`move`).

Step I/O is numpy on the host for every backend: logits come back as float32 numpy (sampling is
host-side) and inputs are small int/bool arrays; device backends copy them into static device
buffers of their own (which is also what makes CUDA-graph replay possible).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np

from mtad_trt.contract import ModelSpec, StepInputs


@runtime_checkable
class ModelRunner(Protocol):
    """Lifecycle: `reserve(n)` before a step that needs n cache slots (grows the S bucket; never
    shrinks while sequences live), `step(...)`, then `keep(...)` for the rows worth caching. The
    logits array returned by `step` is a view of a reused buffer: valid until the next `step`.
    """

    spec: ModelSpec  # spec.max_seq_len is the capacity: the most slots a sequence may use
    name: str  # "ort-cpu", "torch-cuda", "trt", ...
    # True when `step(inputs, first_row=r)` runs the B input rows on cache rows r..r+B-1 (any
    # window of rows; others always start at row 0). A lone newcomer in row 9 then costs one row,
    # not ten. Device backends bind fixed addresses per shape (CUDA graphs), so they keep row 0.
    row_window: bool = False

    @property
    def bucket(self) -> int:
        """Slots in the current S bucket (the S of the next step's attention mask)."""
        ...

    def reserve(self, slots: int) -> int:
        """Make the cache hold at least `slots` slots; returns the (possibly larger) bucket."""
        ...

    def reset(self) -> None:
        """Forget every sequence (shrinks back to the smallest bucket)."""
        ...

    def shrink(self, slots: int) -> int:
        """Move to a smaller bucket that still holds `slots` slots of every row; returns the bucket."""
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

    def read(self, row: int, start: int, count: int) -> Any:
        """A host copy of cache slots [start, start + count) of batch row `row` (prefix caching)."""
        ...

    def write(self, row: int, start: int, block: Any) -> None:
        """Write a `read` copy back into slots [start, ...) of batch row `row` (within the bucket)."""
        ...

    def close(self) -> None:
        """Release sessions and buffers."""
        ...


class SlotCacheRunner:
    """The cache half of `ModelRunner`, shared by every backend: delegate to a slot cache object.

    A backend sets `self.cache` (a `kvcache.SlotCache`) and `self._new_kv` (the last step's new
    K/V rows); what differs between backends is only `step`.
    """

    cache: Any
    _new_kv: Any

    @property
    def bucket(self) -> int:
        return self.cache.size

    def reserve(self, slots: int) -> int:
        return self.cache.reserve(slots)

    def reset(self) -> None:
        self.cache.reset()

    def shrink(self, slots: int) -> int:
        return self.cache.shrink(slots)

    row_window = False  # backends that bind the cache per step set True (see ModelRunner.row_window)
    _first_row = 0  # the cache row the last step's batch row 0 was (a step on a window of rows)

    def keep(self, row: int, src: np.ndarray, dst: np.ndarray) -> None:
        self.cache.keep(self._new_kv, row, src, dst, new_row=row - self._first_row)

    def move(self, row: int, src: np.ndarray, dst: np.ndarray) -> None:
        self.cache.move(row, src, dst)

    def read(self, row: int, start: int, count: int) -> Any:
        return self.cache.read(row, start, count)

    def write(self, row: int, start: int, block: Any) -> None:
        self.cache.write(row, start, block)


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ShapeCache(Generic[K, V]):
    """Buffers reused per step shape. Decode and verify shapes are few and come back every step;
    prompt shapes come and go, so past `limit` entries the cache starts over rather than grow.
    The one eviction rule for every per-shape buffer cache in the runtime."""

    limit = 32

    def __init__(self, make: Callable[[K], V]) -> None:
        self._make = make
        self._items: dict[K, V] = {}

    def get(self, key: K) -> V:
        item = self._items.get(key)
        if item is None:
            if len(self._items) >= self.limit:
                self._items.clear()
            item = self._items[key] = self._make(key)
        return item

    def clear(self) -> None:
        self._items.clear()
