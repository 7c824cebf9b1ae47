"""Logit processing and sampling (spec/mtad.md §1, `proc_T`).

The same processing applies to draft and target, and the MTAD ratio test and the bonus token both
use the processed (truncated, renormalised) distributions, not the raw softmax. Temperature 0
means one-hot distributions at the argmax, which makes every decoder deterministic and equal to
greedy target decoding (spec property P1).
"""

from __future__ import annotations

import numpy as np

from mtad_trt.params import SamplingParams


def process(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """proc_T: temperature, then top-k, then top-p, as a dense probability vector per row.

    logits: [..., V] float32. Returns float64 probabilities of the same shape. With top-k on (the
    default), only the k survivors are ever exponentiated and sorted: on a 150k vocabulary this
    is what keeps sampling a small share of a CPU decode step.
    """
    logits = np.asarray(logits)
    v = logits.shape[-1]
    if params.temperature == 0:
        out = np.zeros(logits.shape)
        np.put_along_axis(out, logits.argmax(-1)[..., None], 1.0, axis=-1)
        return out
    k = params.top_k
    if 0 < k < v:
        idx = np.argpartition(logits, v - k, axis=-1)[..., v - k :]
        top = np.take_along_axis(logits, idx, -1)
        # Ties with the k-th logit are kept (as torch.topk-based filters do): rare, handled densely.
        if not (np.count_nonzero(logits >= top.min(-1, keepdims=True), axis=-1) > k).any():
            p = _softmax(top.astype(np.float64) / params.temperature)
            if params.top_p < 1.0:
                p = _top_p(p, params.top_p)
            out = np.zeros(logits.shape)
            np.put_along_axis(out, idx, p, axis=-1)
            return out
    x = logits.astype(np.float64) / params.temperature
    if 0 < k < v:
        kth = np.partition(x, v - k, axis=-1)[..., v - k : v - k + 1]
        x = np.where(x >= kth, x, -np.inf)
    p = _softmax(x)
    if params.top_p < 1.0:
        p = _top_p(p, params.top_p)
    return p


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
