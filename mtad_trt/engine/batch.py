"""Packing many rows' calls into one model call (docs/graph-contract.md §3, "Batching").

Every request owns one batch row of each model's cache. A phase's calls — every row's draft
depth d, or every row's verify — go into one step of shape [R, T]: R is the smallest row bucket
(1, 2, 4, 8, 16 …) holding the highest row in use, T the widest call. A row with a narrower call
is padded with tokens that see only themselves; rows without a call this phase are all padding.
Padding is never kept, so it can never leak into a live row's cache.
"""

from __future__ import annotations

from collections.abc import Sequence

from mtad_trt.backends.rows import Row, fill_row, pad_inputs
from mtad_trt.backends.runner import ModelRunner, ShapeCache
from mtad_trt.contract import RowLogits, StepInputs, as_step_out
from mtad_trt.engine.decoders.base import Call


def row_buckets(max_rows: int) -> list[int]:
    """Row counts a step may have: powers of two up to (and always including) max_rows, so that
    the shape keys (B, T, K, S) — and CUDA graphs — stay few."""
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    return out + [max_rows]


class Batcher:
    """Runs one runner's share of a phase: `run([(row, call), ...])` -> each call's logits rows."""

    def __init__(self, runner: ModelRunner, max_rows: int) -> None:
        self.runner = runner
        self.buckets = row_buckets(max_rows)
        window = runner.spec.window
        self._bufs: ShapeCache[tuple[int, int, int, int], StepInputs] = ShapeCache(
            lambda key: StepInputs.zeros(*key, window=window))

    def rows_for(self, highest: int) -> int:
        return next(b for b in self.buckets if b > highest)

    def run(self, calls: Sequence[tuple[Row, Call]]) -> list[RowLogits]:
        s = self.runner.reserve(max(row.fits(len(call.tokens), call.slots) for row, call in calls))
        lo, hi = min(row.row for row, _ in calls), max(row.row for row, _ in calls) + 1
        if self.runner.row_window:  # only the rows in use, padded to a bucket
            r = self.rows_for(hi - lo - 1)
            lo = min(lo, self.buckets[-1] - r)  # the window stays inside the cache
        else:  # rows 0..highest
            r, lo = self.rows_for(hi - 1), 0
        t = max(len(call.tokens) for _, call in calls)
        k = max(len(call.rows) for _, call in calls)
        inp = self._bufs.get((r, t, k, s))
        pad_inputs(inp, s, t)
        for row, call in calls:
            fill_row(inp, row.row - lo, row.n, call.tokens, call.parents, call.cache_ancestors, call.rows)
        step = self.runner.step(inp, first_row=lo) if lo else self.runner.step(inp)
        out = as_step_out(step, self.runner.spec.vocab_size)
        return [out.row(row.row - lo, len(call.rows)) for row, call in calls]
