"""A batch-row cursor: one sequence's slots on one model runner, and the step inputs it feeds.

Committed tokens occupy cache slots 0..n-1 of batch row `row`, contiguous (compaction keeps them
so). Everything a decoder feeds — a prompt, a single token, a verify chain, a draft tree level, a
whole candidate tree — is described the same way: tokens in topological order, each with a parent
inside the block (or -1: child of the committed prefix) and optionally extra visible cache slots
(ancestors already written to scratch slots by an earlier step). `fill_row` derives the positions
(siblings share one) and the attention mask (committed prefix + ancestors + self) from that,
which is all the contract needs (docs/graph-contract.md §3).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtad_trt.backends.kvcache import check_capacity
from mtad_trt.backends.runner import ModelRunner, ShapeCache
from mtad_trt.contract import StepInputs, StepOut, as_step_out


def fill_row(
    inp: StepInputs,
    r: int,
    n: int,
    tokens: Sequence[int] | np.ndarray,
    parents: Sequence[int] | None,
    cache_ancestors: Sequence[Sequence[int]] | None,
    logits_rows: Sequence[int],
) -> None:
    """Write one row's tokens, positions, mask and logits rows into batch row `r` of `inp`.

    `n` is the row's committed length; the buffers may be wider than this row's block (padding
    columns are left as the caller set them). parents=None and cache_ancestors=None mean a chain.
    """
    t = len(tokens)
    s = inp.attention_mask.shape[-1] - inp.input_ids.shape[1]
    inp.input_ids[r, :t] = tokens
    inp.logits_index[r, : len(logits_rows)] = logits_rows
    mask = inp.attention_mask[r, 0]
    pos = inp.position_ids[r]
    mask[:t] = False
    mask[:t, :n] = True
    if parents is None and cache_ancestors is None:
        mask[:t, s : s + t] = np.tri(t, dtype=bool)
        pos[:t] = np.arange(n, n + t)
    else:
        parents = [-1] * t if parents is None else parents
        for i in range(t):
            p = parents[i]
            if p >= 0:
                if p >= i:
                    raise ValueError("tokens must come after their parents")
                mask[i] = mask[p]
                pos[i] = pos[p] + 1
            else:
                extra = cache_ancestors[i] if cache_ancestors is not None else ()
                if len(extra):
                    mask[i, list(extra)] = True
                pos[i] = n + len(extra)
            mask[i, s + i] = True
    if inp.sliding_mask is not None:
        _window(inp, r, n, t, s, cache_ancestors)


def pad_inputs(inp: StepInputs, s: int, t: int) -> None:
    """Every token a padding token at position 0 that sees only itself (no all-masked softmax row)."""
    inp.input_ids[:] = 0
    inp.position_ids[:] = 0
    inp.logits_index[:] = 0
    diag = s + np.arange(t)
    for mask in (inp.attention_mask, inp.sliding_mask):
        if mask is not None:
            mask[:] = False
            mask[:, 0, np.arange(t), diag] = True


def _window(inp: StepInputs, r: int, n: int, t: int, s: int, cache_ancestors) -> None:
    """The sliding-window mask: attention_mask restricted to keys with q_pos - k_pos < W.

    A key's position is its column's: committed slot j holds position j; a scratch slot holding
    the e-th ancestor of a root token holds position n + e; new column s + j holds pos[j].
    """
    pos = inp.position_ids[r, :t]
    key_pos = np.arange(s + t, dtype=np.int64)
    if cache_ancestors is not None:
        for extra in cache_ancestors:
            for depth, slot in enumerate(extra):
                key_pos[slot] = n + depth
    key_pos[s : s + t] = pos
    slide = inp.sliding_mask[r, 0]
    slide[:t] = inp.attention_mask[r, 0, :t] & (pos[:, None] - key_pos[None, :] < inp.window)

class Row:
    """Batch row `row` of one runner, with `n` committed tokens; `forward` runs a one-row step."""

    def __init__(self, runner: ModelRunner, row: int = 0) -> None:
        self.runner = runner
        self.row = row
        self.n = 0  # committed tokens in the cache
        window = runner.spec.window
        self._bufs: ShapeCache[tuple[int, int, int], StepInputs] = ShapeCache(
            lambda key: StepInputs.zeros(1, *key, window=window))

    def reset(self) -> None:
        self.n = 0
        self.runner.reset()

    @property
    def capacity(self) -> int:
        """The most cache slots this row may ever use."""
        return self.runner.spec.max_seq_len

    def fits(self, t: int, slots: int = 0) -> int:
        """The slots in use after a T-token step (or `slots`, when more); CapacityError past capacity."""
        need = max(self.n + t, slots)
        check_capacity(need, self.capacity)
        return need

    def forward(self, *args, **kwargs) -> np.ndarray:
        """Run one step (arguments as `step`); returns float32 logits [K, V] for `logits_rows`."""
        return self.step(*args, **kwargs).logits[0]

    def step(
        self,
        tokens: Sequence[int] | np.ndarray,
        parents: Sequence[int] | None = None,
        logits_rows: Sequence[int] | None = None,
        cache_ancestors: Sequence[Sequence[int]] | None = None,
        slots: int = 0,
    ) -> StepOut:
        """Run one one-row step; returns what the runner returned (logits rows `logits_rows`,
        default the last token, and the top-k head when the graph has one).

        parents=None means a causal chain. `slots` is how many cache slots will be in use after
        this step's `keep` when that is more than n + T (draft tree nodes in scratch slots): they
        are reserved now, so the S bucket cannot change between this step and its `keep`.
        """
        t = len(tokens)
        rows = [t - 1] if logits_rows is None else list(logits_rows)
        s = self.runner.reserve(self.fits(t, slots))
        inp = self._bufs.get((t, len(rows), s))
        fill_row(inp, 0, self.n, tokens, parents, cache_ancestors, rows)
        if self.row and self.runner.row_window:  # this row's own cache row
            return as_step_out(self.runner.step(inp, first_row=self.row), self.runner.spec.vocab_size)
        return as_step_out(self.runner.step(inp), self.runner.spec.vocab_size)

    def keep(self, src: Sequence[int] | np.ndarray, dst: Sequence[int] | np.ndarray) -> None:
        """Write the last step's new K/V rows `src` into slots `dst`."""
        self.runner.keep(self.row, np.asarray(src, np.int64), np.asarray(dst, np.int64))

    def commit_chain(self, count: int, start: int = 0) -> None:
        """Keep `count` block rows from `start` as the next committed tokens."""
        if count:
            self.keep(np.arange(start, start + count), np.arange(self.n, self.n + count))
            self.n += count

    def move(self, src: Sequence[int], dst: Sequence[int]) -> None:
        self.runner.move(self.row, np.asarray(src, np.int64), np.asarray(dst, np.int64))
