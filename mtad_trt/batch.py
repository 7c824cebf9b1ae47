"""Packing many rows' calls into one model call (engine-contract §3, "Batching").

Every request owns one batch row of each model's cache. A phase's calls — every row's draft
depth d, or every row's verify — go into one step of shape [R, T]: R is the smallest row bucket
(1, 2, 4, 8, 16 …) holding the highest row in use, T the widest call. A row with a narrower call
is padded with tokens that see only themselves; rows without a call this phase are all padding.
Padding is never kept, so it can never leak into a live row's cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtad_trt.contract import RowLogits, StepInputs, as_step_out
from mtad_trt.decoders.base import Call
from mtad_trt.errors import CapacityError
from mtad_trt.rows import Row, fill_row
from mtad_trt.runner import ModelRunner, ShapeCache


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
        spec = runner.spec
        window = spec.sliding_window if spec.has_sliding_layers else None
        self._bufs: ShapeCache[tuple[int, int, int, int], StepInputs] = ShapeCache(
            lambda key: StepInputs.zeros(*key, window=window))

    def rows_for(self, highest: int) -> int:
        return next(b for b in self.buckets if b > highest)

    def run(self, calls: Sequence[tuple[Row, Call]]) -> list[RowLogits]:
        cap = self.runner.spec.max_seq_len
        need = 0
        for row, call in calls:
            n = max(row.n + len(call.tokens), call.slots)
            if n > cap:
                raise CapacityError(f"sequence needs {n} KV slots; the engine's capacity is {cap}")
            need = max(need, n)
        s = self.runner.reserve(need)
        r = self.rows_for(max(row.row for row, _ in calls))
        t = max(len(call.tokens) for _, call in calls)
        k = max(len(call.rows) for _, call in calls)
        inp = self._bufs.get((r, t, k, s))
        _pad(inp, s, t)
        for row, call in calls:
            fill_row(inp, row.row, row.n, call.tokens, call.parents, call.cache_ancestors, call.rows)
        out = as_step_out(self.runner.step(inp), self.runner.spec.vocab_size)
        return [out.row(row.row, len(call.rows)) for row, call in calls]


def _pad(inp: StepInputs, s: int, t: int) -> None:
    """Every token a padding token at position 0 that sees only itself (no all-masked softmax row)."""
    inp.input_ids[:] = 0
    inp.position_ids[:] = 0
    inp.logits_index[:] = 0
    diag = s + np.arange(t)
    for mask in (inp.attention_mask, inp.sliding_mask):
        if mask is not None:
            mask[:] = False
            mask[:, 0, np.arange(t), diag] = True
