"""Log-probabilities of emitted and prompt tokens, as an evaluation harness reads them.

Definition (vLLM's default, "raw"): the log-softmax of the *target's* raw logits at the position
that emitted the token, before temperature, top-k and top-p. Every decoder already holds those
logits: a speculative decoder's verify call returns the target's logits for every drafted
position it accepts and for the bonus token, so no extra model call is made and a token accepted
from a draft gets the target's log-probability, not the draft's. Prompt tokens get theirs from
the prefill (every chunk asks for all its rows); the first prompt token has none (`None`).

A server started with `--logprobs-mode processed` returns, for generated tokens, the log of the
distribution the token was drawn from instead: the target's row after temperature, top-k and
top-p (`sampling.process`, the same function the decoders sample and verify with). Tokens outside
that distribution's support get -inf (the server sends its floor, as JSON has no -inf); at
temperature 0 the drawn token gets 0. Prompt tokens were not sampled, so their log-probabilities
are always the raw ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtad_trt.engine.params import SamplingParams
from mtad_trt.engine.sampling import process
from mtad_trt.engine.scoring import log_softmax


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the `k` most likely tokens at its position (descending)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def full_rows(logits: Any) -> np.ndarray:
    """The raw logits [K, V] of a decoder's logits (a RowLogits or an array)."""
    full = getattr(logits, "full", logits)
    return np.asarray(full, dtype=np.float32).reshape(-1, np.shape(full)[-1])


def processed_log_probs(row: np.ndarray, params: SamplingParams) -> np.ndarray:
    """log of `process(row, params)` over the whole vocabulary (-inf outside its support)."""
    tokens, p = process(row, params).support(0)
    lp = np.full(row.shape[-1], -np.inf)
    with np.errstate(divide="ignore"):
        lp[tokens] = np.log(p)
    return lp


def token_logprobs(logits: Any, rows: Sequence[int], tokens: Sequence[int], k: int,
                   processed: SamplingParams | None = None) -> list[TokenLogprob]:
    """`tokens[i]`'s log-probability under logits row `rows[i]`, with the row's top `k`: of the raw
    row, or (`processed`) of the distribution those sampling settings make of it."""
    full = full_rows(logits)
    out = []
    for r, tok in zip(rows, tokens, strict=True):
        if processed is None:
            lp = log_softmax(full[r].astype(np.float64))
        else:
            lp = processed_log_probs(full[r].astype(np.float64), processed)
        top: tuple[tuple[int, float], ...] = ()
        if k > 0:
            idx = np.argpartition(-lp, k - 1)[:k] if k < lp.size else np.arange(lp.size)
            idx = idx[np.lexsort((idx, -lp[idx]))]  # descending, ties by token id: deterministic
            top = tuple((int(i), float(lp[i])) for i in idx)
        out.append(TokenLogprob(int(tok), float(lp[int(tok)]), top))
    return out
