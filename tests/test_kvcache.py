"""Static-slot cache: buckets, re-layout on growth, keep/move and reset, for the host (numpy) and the
device (torch) cache alike — one rule each, checked against plain numpy copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtad_trt.backends.kvcache import HostKVCache, TorchKVCache, bucket_sizes
from mtad_trt.contract import ModelSpec
from mtad_trt.errors import CapacityError

KINDS = ["host", "torch"]


def make(kind: str, spec: ModelSpec, batch: int = 1, smallest: int = 128):
    if kind == "host":
        return HostKVCache(spec, batch=batch, smallest_bucket=smallest)
    return TorchKVCache(spec, batch=batch, device="cpu", dtype=torch.float32, smallest_bucket=smallest)


def as_np(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def fill(cache, rng) -> list[np.ndarray]:
    """Random values in every view of every row (all rows then hold data); returns numpy copies."""
    ref = []
    for v in cache.views:
        r = rng.normal(size=tuple(v.shape)).astype(np.float32)
        v[...] = torch.from_numpy(r) if isinstance(v, torch.Tensor) else r
        ref.append(r)
    cache.live = cache.batch  # written behind keep/write's back: say so
    return ref


def new_rows(kind: str, shape: tuple[int, ...], n: int) -> list:
    rows = [np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) + 100 * i for i in range(n)]
    return rows if kind == "host" else [torch.from_numpy(r) for r in rows]


def test_buckets():
    assert bucket_sizes(2048) == [128, 256, 512, 1024, 2048]
    assert bucket_sizes(300) == [128, 256, 300]
    assert bucket_sizes(64) == [64]


@pytest.mark.parametrize("kind", KINDS)
def test_growth_keeps_every_slot(kind):
    spec = ModelSpec(2, 3, 4, 10, "float32", 1000, "x")
    c = make(kind, spec, batch=2)
    ref = fill(c, np.random.default_rng(0))
    ptrs = [as_np(v).ctypes.data for v in c.views]
    assert c.reserve(300) == 512
    for v, r, p in zip(c.views, ref, ptrs, strict=True):
        a = as_np(v)
        assert a.shape == (2, 3, 512, 4) and a.flags.c_contiguous
        assert a.ctypes.data == p  # same address for every bucket: CUDA graphs and TensorRT rely on it
        np.testing.assert_array_equal(a[:, :, :128], r)
        assert np.isfinite(a).all()  # the slots beyond hold old values, masked, never NaN
    with pytest.raises(CapacityError, match="capacity is 1000"):
        c.reserve(1001)


@pytest.mark.parametrize("kind", KINDS)
def test_growth_and_shrink_move_only_rows_that_hold_data(kind, monkeypatch):
    """16 rows allocated, rows 0 and 2 written through keep / write: a re-layout copies those rows
    (and row 1, below them), not all 16 — the stall every running stream waits through."""
    spec = ModelSpec(2, 2, 4, 10, "float32", 1000, "x")
    c = make(kind, spec, batch=16)
    new = new_rows(kind, (1, 2, 3, 4), 4)
    c.keep(new, 0, np.arange(3), np.arange(3))
    block = c.read(0, 0, 3)
    c.write(2, 5, block)
    copied = []
    clone = c._clone
    monkeypatch.setattr(c, "_clone", lambda a: copied.append(tuple(a.shape)) or clone(a))
    assert c.reserve(200) == 256
    # every live head-row but the first moves: per tensor on the host, across all 4 tensors at once on torch
    moved = [(128 * 4,)] * (3 * 2 - 1) * 4 if kind == "host" else [(4, 128 * 4)] * (3 * 2 - 1)
    assert copied == moved
    for v, n in zip(c.views, new, strict=True):
        np.testing.assert_array_equal(as_np(v)[0, :, :3], as_np(n)[0])
        np.testing.assert_array_equal(as_np(v)[2, :, 5:8], as_np(n)[0])
    copied.clear()
    assert c.shrink(20) == 128 and copied == moved
    np.testing.assert_array_equal(as_np(c.views[1])[2, :, 5:8], as_np(new[1])[0])
    c.reset()
    copied.clear()
    assert c.reserve(200) == 256 and copied == []  # nothing written since the reset: nothing to move


@pytest.mark.parametrize("kind", KINDS)
def test_keep_and_move(kind):
    spec = ModelSpec(1, 2, 3, 10, "float32", 256, "x")
    c = make(kind, spec)
    new = new_rows(kind, (1, 2, 5, 3), 2)
    c.keep(new, 0, np.array([0, 3]), np.array([10, 11]))
    np.testing.assert_array_equal(as_np(c.views[1])[0, :, 11], as_np(new[1])[0, :, 3])
    c.keep(new, 0, np.array([4]), np.array([20]))  # the single-row path
    np.testing.assert_array_equal(as_np(c.views[0])[0, :, 20], as_np(new[0])[0, :, 4])
    c.move(0, np.array([10, 11]), np.array([11, 12]))  # overlapping: reads happen before writes
    np.testing.assert_array_equal(as_np(c.views[0])[0, :, 12], as_np(new[0])[0, :, 3])
    np.testing.assert_array_equal(as_np(c.views[0])[0, :, 11], as_np(new[0])[0, :, 0])


@pytest.mark.parametrize("kind", KINDS)
def test_reset_shrinks_without_zeroing(kind):
    """One reset policy: back to the smallest bucket; stale slots keep their (finite) values."""
    spec = ModelSpec(1, 2, 3, 10, "float32", 40, "x")
    c = make(kind, spec, batch=2, smallest=8)
    c.reserve(20)
    ref = fill(c, np.random.default_rng(1))
    c.reset()
    assert c.size == 8
    for v, r in zip(c.views, ref, strict=True):
        assert tuple(v.shape) == (2, 2, 8, 3)
        # the bucket-8 view is the flat prefix: the first 8 slots of row (0, head 0), then the next 8 ...
        np.testing.assert_array_equal(as_np(v).ravel(), r.ravel()[: 2 * 2 * 8 * 3])


@pytest.mark.parametrize("kind", KINDS)
def test_shrink_keeps_the_slots_that_still_fit_and_read_write_round_trip(kind):
    spec = ModelSpec(2, 3, 4, 10, "float32", 1000, "x")
    c = make(kind, spec, batch=2)
    c.reserve(600)  # a long prompt grew the bucket to 1000
    ref = fill(c, np.random.default_rng(1))
    ptrs = [as_np(v).ctypes.data for v in c.views]
    assert c.shrink(300) == 512 and c.size == 512
    for v, r, p in zip(c.views, ref, ptrs, strict=True):
        a = as_np(v)
        assert a.shape == (2, 3, 512, 4) and a.ctypes.data == p
        np.testing.assert_array_equal(a, r[:, :, :512])  # every row's first 512 slots, in place
    assert c.shrink(900) == 512  # never grows
    block = c.read(1, 10, 16)
    assert tuple(block.shape) == (4, 3, 16, 4)
    np.testing.assert_array_equal(as_np(block[0]), ref[0][1, :, 10:26])
    c.write(0, 100, block)
    np.testing.assert_array_equal(as_np(c.views[3])[0, :, 100:116], ref[3][1, :, 10:26])
