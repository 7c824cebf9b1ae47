"""Teacher-forced scoring: the log-probability a model gives each token of a known continuation,
and the perplexity those log-probs make.

The runtime's one way to judge text under a model (raw softmax: no temperature, top-k or top-p):
the export's quantization check compares a float and a quantized graph with it
(`token_weighted_perplexity`), and `Pipeline.score` gives the bench the perplexity of generated
text under the target (`mtad_trt.bench.quality` adds the paper's per-sample variant).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mtad_trt.backends.rows import Row
from mtad_trt.errors import MtadError

# Log-probs are <= 0 by definition; allow a little float noise from log_softmax before refusing.
LOGPROB_SLACK = 1e-4


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def token_logprobs(row: Row, context: list[int], continuation: list[int], chunk: int = 256) -> np.ndarray:
    """log p(continuation[i] | context + continuation[:i]) under the raw model, one value per token.

    Runs chunked prefills (logits only where needed) so long texts never need a T x V buffer
    larger than `chunk` rows.
    """
    if not context:
        raise ValueError("scoring needs at least one context token")
    ids = list(context) + list(continuation)
    first = len(context) - 1  # logits at position first predict continuation[0]
    row.reset()
    out = np.empty(len(continuation))
    pos = 0
    while pos < len(ids) - 1:
        block = ids[pos : pos + chunk]
        rows = [r for r in range(len(block)) if first <= pos + r < len(ids) - 1]
        if rows:
            logits = row.forward(block, logits_rows=rows)
            lp = log_softmax(logits)
            for k, r in enumerate(rows):
                out[pos + r - first] = lp[k, ids[pos + r + 1]]
        else:
            row.forward(block, logits_rows=[len(block) - 1])
        row.commit_chain(len(block))
        pos += len(block)
    row.reset()
    return out


def checked_samples(per_sample_token_logprobs: Sequence[Any]) -> list[np.ndarray]:
    """Per-sample natural-log probabilities as float64 arrays, refused in one line when they cannot
    make a perplexity (no samples, an empty sample, NaN, or values > 0)."""
    if len(per_sample_token_logprobs) == 0:
        raise MtadError("perplexity needs at least one sample")
    out = []
    for i, s in enumerate(per_sample_token_logprobs):
        a = np.asarray(s, dtype=np.float64).reshape(-1)
        if a.size == 0:
            raise MtadError(f"perplexity: sample {i} has no tokens (its mean log-prob is undefined)")
        if np.isnan(a).any():
            raise MtadError(f"perplexity: sample {i} contains NaN log-probs")
        if (a > LOGPROB_SLACK).any():
            raise MtadError(
                f"perplexity: sample {i} has log-probs > 0 (max {a.max():.4g}); pass natural-log "
                "probabilities (<= 0), not probabilities or negated log-probs"
            )
        out.append(a)
    return out


def token_weighted_perplexity(per_sample_token_logprobs: Sequence[Any]) -> float:
    """exp(-mean log-prob over all tokens of all samples): every token weighs the same ("micro").

    The standard LM-evaluation definition; longer samples count more. See
    `mtad_trt.bench.quality.perplexity` for the paper's per-sample-mean variant.
    """
    samples = checked_samples(per_sample_token_logprobs)
    total = float(sum(a.sum() for a in samples))
    count = sum(a.size for a in samples)
    return math.exp(-total / count)
