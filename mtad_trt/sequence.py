"""One sequence on one engine: slot bookkeeping and step-input building.

Committed tokens occupy cache slots 0..n-1 of batch row `row`, contiguous (compaction keeps them
so). Everything a decoder feeds — a prompt, a single token, a verify chain, a draft tree level, a
whole candidate tree — is described the same way: tokens in topological order, each with a parent
inside the block (or -1: child of the committed prefix) and optionally extra visible cache slots
(ancestors already written to scratch slots by an earlier step). From that this module derives
the positions (siblings share one) and the attention mask (committed prefix + ancestors + self),
which is all the contract needs (engine-contract §3).

Input buffers are reused per (T, K, S) shape, so decode/verify steps allocate nothing here.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np

from mtad_trt.engine import Engine, StepInputs
from mtad_trt.errors import CapacityError


class Sequence:
    def __init__(self, engine: Engine, row: int = 0) -> None:
        self.engine = engine
        self.row = row
        self.n = 0  # committed tokens in the cache
        self._bufs: dict[tuple[int, int, int], StepInputs] = {}

    def reset(self) -> None:
        self.n = 0
        self.engine.reset()

    @property
    def capacity(self) -> int:
        return self.engine.spec.max_seq_len

    def _inputs(self, t: int, k: int, s: int) -> StepInputs:
        key = (t, k, s)
        buf = self._bufs.get(key)
        if buf is None:
            if len(self._bufs) > 32:  # prefill shapes come and go; decode shapes are few
                self._bufs.clear()
            buf = StepInputs(
                input_ids=np.zeros((1, t), np.int64),
                position_ids=np.zeros((1, t), np.int64),
                attention_mask=np.zeros((1, 1, t, s + t), bool),
                logits_index=np.zeros((1, k), np.int64),
            )
            self._bufs[key] = buf
        return buf

    def forward(
        self,
        tokens: Seq[int] | np.ndarray,
        parents: Seq[int] | None = None,
        logits_rows: Seq[int] | None = None,
        cache_ancestors: Seq[Seq[int]] | None = None,
        slots: int = 0,
    ) -> np.ndarray:
        """Run one step; returns float32 logits [K, V] for `logits_rows` (default: the last token).

        parents=None means a causal chain. `slots` is how many cache slots will be in use after
        this step's `keep` when that is more than n + T (draft tree nodes in scratch slots): they
        are reserved now, so the S bucket cannot change between this step and its `keep`.
        """
        t = len(tokens)
        rows = [t - 1] if logits_rows is None else list(logits_rows)
        need = max(self.n + t, slots)
        if need > self.capacity:
            raise CapacityError(f"sequence needs {need} KV slots; the engine's capacity is {self.capacity}")
        s = self.engine.reserve(need)
        inp = self._inputs(t, len(rows), s)
        inp.input_ids[0] = tokens
        inp.logits_index[0] = rows
        mask = inp.attention_mask[0, 0]
        pos = inp.position_ids[0]
        mask[:] = False
        mask[:, : self.n] = True
        if parents is None and cache_ancestors is None:
            mask[:, s:] = np.tri(t, dtype=bool)
            pos[:] = np.arange(self.n, self.n + t)
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
                    pos[i] = self.n + len(extra)
                mask[i, s + i] = True
        return self.engine.step(inp)[0]

    def keep(self, src: Seq[int] | np.ndarray, dst: Seq[int] | np.ndarray) -> None:
        """Write the last step's new K/V rows `src` into slots `dst`."""
        self.engine.keep(self.row, np.asarray(src, np.int64), np.asarray(dst, np.int64))

    def commit_chain(self, count: int, start: int = 0) -> None:
        """Keep `count` block rows from `start` as the next committed tokens."""
        if count:
            self.keep(np.arange(start, start + count), np.arange(self.n, self.n + count))
            self.n += count

    def move(self, src: Seq[int], dst: Seq[int]) -> None:
        self.engine.move(self.row, np.asarray(src, np.int64), np.asarray(dst, np.int64))
