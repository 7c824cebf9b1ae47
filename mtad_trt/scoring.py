"""Teacher-forced scoring: the log-probability a model gives each token of a known continuation.

The runtime's one way to judge text under a model (raw softmax: no temperature, top-k or top-p):
the export's quantization check compares a float and a quantized graph with it, and
`Pipeline.score` gives the bench the perplexity of generated text under the target.
"""

from __future__ import annotations

import numpy as np

from mtad_trt.rows import Row


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
