"""Output quality under a model: teacher-forced log-probabilities and perplexity.

Used by the export's quantization check (quantized vs float graph on the same text) and by the
bench (perplexity of generated text under the raw target: no temperature / top-k / top-p).
"""

from __future__ import annotations

import numpy as np

from mtad_trt.sequence import Sequence


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def token_logprobs(seq: Sequence, context: list[int], continuation: list[int], chunk: int = 256) -> np.ndarray:
    """log p(continuation[i] | context + continuation[:i]) under the raw model, one value per token.

    Runs chunked prefills (logits only where needed) so long texts never need a T x V buffer
    larger than `chunk` rows.
    """
    if not context:
        raise ValueError("scoring needs at least one context token")
    ids = list(context) + list(continuation)
    first = len(context) - 1  # logits at position first predict continuation[0]
    seq.reset()
    out = np.empty(len(continuation))
    pos = 0
    while pos < len(ids) - 1:
        block = ids[pos : pos + chunk]
        rows = [r for r in range(len(block)) if first <= pos + r < len(ids) - 1]
        if rows:
            logits = seq.forward(block, logits_rows=rows)
            lp = log_softmax(logits)
            for k, r in enumerate(rows):
                out[pos + r - first] = lp[k, ids[pos + r + 1]]
        else:
            seq.forward(block, logits_rows=[len(block) - 1])
        seq.commit_chain(len(block))
        pos += len(block)
    seq.reset()
    return out


def perplexity(logprobs: np.ndarray) -> float:
    return float(np.exp(-np.mean(logprobs)))
