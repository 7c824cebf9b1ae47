"""Logit processing and sampling (docs/algorithm.md §1, `proc_T`).

The same processing applies to draft and target, and the MTAD ratio test and the bonus token both
use the processed (truncated, renormalised) distributions, not the raw softmax. Temperature 0
means one-hot distributions at the argmax, which makes every decoder deterministic and equal to
greedy target decoding (spec property P1).

A processed distribution is a `Dist`: sparse (the k tokens that survive top-k, sorted by token
id) whenever top-k or greedy is on, dense only for top_k = 0. Decoders never touch the whole
vocabulary when they need not, and with a graph's top-k head (docs/graph-contract.md, `topk_values` /
`topk_indices` / `logsumexp`) the full logits are never even read. Sorting the survivors by token
id makes inverse-CDF sampling pick exactly the token the dense vector would give.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mtad_trt.engine.params import SamplingParams


class Dist:
    """Probabilities of N rows over a V-token vocabulary: dense `p` [N, V] (idx None), or sparse
    `p` [N, k] over tokens `idx` [N, k] (ascending per row; p = 0 marks padding)."""

    __slots__ = ("p", "idx", "vocab")

    def __init__(self, p: np.ndarray, idx: np.ndarray | None = None, vocab: int | None = None) -> None:
        self.p = np.atleast_2d(p)
        self.idx = None if idx is None else np.atleast_2d(idx)
        self.vocab = self.p.shape[-1] if idx is None else int(vocab)

    def __len__(self) -> int:
        return self.p.shape[0]

    def rows(self, sel) -> Dist:
        """The rows `sel` (an index, a slice or an index array) as a Dist."""
        sel = [sel] if isinstance(sel, (int, np.integer)) else sel
        return Dist(self.p[sel], None if self.idx is None else self.idx[sel], self.vocab)

    def support(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, probabilities) of one row, tokens ascending."""
        if self.idx is None:
            return np.arange(self.vocab), self.p[row]
        return self.idx[row], self.p[row]

    def prob(self, rows, tokens) -> np.ndarray:
        """p[row, token] for paired rows and tokens (0 outside a row's support)."""
        rows, tokens = np.broadcast_arrays(np.asarray(rows), np.asarray(tokens))
        if self.idx is None:
            return self.p[rows, tokens]
        out = np.zeros(rows.shape)
        for r in np.unique(rows):
            sel = rows == r
            out[sel] = self.at(int(r), tokens[sel])
        return out

    def at(self, row: int, tokens: np.ndarray) -> np.ndarray:
        """One row's probabilities of `tokens` (0 outside its support)."""
        tokens = np.asarray(tokens)
        if self.idx is None:
            return self.p[row, tokens]
        idx = self.idx[row]
        pos = np.minimum(np.searchsorted(idx, tokens), len(idx) - 1)
        return np.where(idx[pos] == tokens, self.p[row, pos], 0.0)

    def dense(self) -> np.ndarray:
        """[N, V] probabilities (for tests and references)."""
        if self.idx is None:
            return self.p
        out = np.zeros((len(self), self.vocab))
        np.put_along_axis(out, self.idx, self.p, axis=-1)
        return out

    def sample(self, rng: np.random.Generator, row: int = 0) -> int:
        tokens, p = self.support(row)
        return int(tokens[sample(p, rng)])

    def sample_many(self, n: int, rng: np.random.Generator, row: int = 0) -> np.ndarray:
        tokens, p = self.support(row)
        return tokens[sample_many(p, n, rng)]


def process(logits: Any, params: SamplingParams) -> Dist:
    """proc_T: temperature, then top-k, then top-p.

    `logits` is a float array [..., V] (one row or many), or a step's `RowLogits` — whose top-k
    head, when the graph has one, answers greedy and top-k <= head size without the full logits.
    """
    top = getattr(logits, "top", None)
    k = params.top_k
    if top is not None and (params.temperature == 0 or 0 < k <= top.values.shape[-1]):
        got = _from_head(top, params)
        if got is not None:
            return got
    if hasattr(logits, "full"):
        logits = logits.full
    logits = np.atleast_2d(np.asarray(logits))
    v = logits.shape[-1]
    if params.temperature == 0:
        return Dist(np.ones((len(logits), 1)), logits.argmax(-1)[:, None], v)
    if 0 < k < v:
        idx = np.argpartition(logits, v - k, axis=-1)[..., v - k :]
        top_logits = np.take_along_axis(logits, idx, -1)
        # Ties with the k-th logit are kept (as torch.topk-based filters do): rare, handled densely.
        if not (np.count_nonzero(logits >= top_logits.min(-1, keepdims=True), axis=-1) > k).any():
            return _sorted(_truncate(top_logits, params), idx, v)
    x = logits.astype(np.float64) / params.temperature
    if 0 < k < v:
        kth = np.partition(x, v - k, axis=-1)[..., v - k : v - k + 1]
        x = np.where(x >= kth, x, -np.inf)
    p = _softmax(x)
    if params.top_p < 1.0:
        p = _top_p(p, params.top_p)
    return Dist(p)


def _from_head(top: Any, params: SamplingParams) -> Dist | None:
    """The head's sorted top values/indices -> the same Dist the full logits would give (None when
    a tie at the k-th value may reach beyond the head: then the caller uses the full logits)."""
    vocab = top.vocab
    if params.temperature == 0:
        return Dist(np.ones((len(top.indices), 1)), top.indices[:, :1], vocab)
    k = params.top_k
    values, indices = top.values[:, :k], top.indices[:, :k]
    if top.values.shape[-1] > k:
        if (top.values[:, k] == top.values[:, k - 1]).any():
            return None
    elif k < vocab:  # the head is exactly k wide: a tie with the k-th value cannot be seen, be safe
        return None
    return _sorted(_truncate(values, params), indices, vocab)


def _truncate(top_logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    p = _softmax(top_logits.astype(np.float64) / params.temperature)
    return _top_p(p, params.top_p) if params.top_p < 1.0 else p


def _sorted(p: np.ndarray, idx: np.ndarray, vocab: int) -> Dist:
    order = np.argsort(idx, axis=-1)
    return Dist(np.take_along_axis(p, order, -1), np.take_along_axis(idx, order, -1), vocab)


def log_top(logits: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [N, n], full-softmax log-probs [N, n]) of each row's n most likely tokens, tokens
    ascending: what greedy beam search ranks by (no temperature, top-k or top-p)."""
    top = getattr(logits, "top", None)
    if top is not None and top.values.shape[-1] >= n:
        lp, tok = top.values[:, :n].astype(np.float64) - top.lse[:, None], top.indices[:, :n]
    else:
        if hasattr(logits, "full"):
            logits = logits.full
        x = np.atleast_2d(np.asarray(logits)).astype(np.float64)
        m = x.max(-1, keepdims=True)
        full = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
        n = min(n, full.shape[-1])
        tok = np.argsort(-full, axis=-1, kind="stable")[:, :n]
        lp = np.take_along_axis(full, tok, -1)
    order = np.argsort(tok, axis=-1, kind="stable")
    return np.take_along_axis(tok, order, -1), np.take_along_axis(lp, order, -1)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _top_p(p: np.ndarray, top_p: float) -> np.ndarray:
    """Nucleus filter: drop a token when the mass of the tokens strictly more likely already exceeds p.

    So the token that first carries the cumulative mass past p is kept, and at least one token
    always survives (the reference code's `norm_logits`).
    """
    order = np.argsort(-p, axis=-1, kind="stable")
    sorted_p = np.take_along_axis(p, order, -1)
    before = np.cumsum(sorted_p, -1) - sorted_p
    drop_sorted = before > top_p
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, -1)
    out = np.where(drop, 0.0, p)
    return out / out.sum(-1, keepdims=True)


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One draw by inverse CDF (cheaper than rng.choice on a 150k vocabulary)."""
    c = np.cumsum(probs)
    i = int(np.searchsorted(c, rng.random() * c[-1], side="right"))
    return min(i, len(probs) - 1)


def sample_many(probs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n i.i.d. draws (with replacement) from one distribution (flattened if 2-D)."""
    c = np.cumsum(probs.ravel())
    idx = np.searchsorted(c, rng.random(n) * c[-1], side="right")
    return np.minimum(idx, c.size - 1)


def log(p: np.ndarray | float) -> np.ndarray | float:
    """log with log(0) = -inf and no warning: a token outside the support has probability 0."""
    with np.errstate(divide="ignore"):
        return np.log(p)
