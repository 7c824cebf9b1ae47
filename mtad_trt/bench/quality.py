"""Output quality: perplexity under the target, defined once for the bench and the export.

Log-probs come from `mtad_trt.scoring` (teacher-forced, raw softmax); these functions turn them
into the numbers reports carry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mtad_trt.errors import MtadError

# Log-probs are <= 0 by definition; allow a little float noise from log_softmax before refusing.
_LOGPROB_SLACK = 1e-4


def _checked_samples(per_sample_token_logprobs: Sequence[Any]) -> list[np.ndarray]:
    if len(per_sample_token_logprobs) == 0:
        raise MtadError("perplexity needs at least one sample")
    out = []
    for i, s in enumerate(per_sample_token_logprobs):
        a = np.asarray(s, dtype=np.float64).reshape(-1)
        if a.size == 0:
            raise MtadError(f"perplexity: sample {i} has no tokens (its mean log-prob is undefined)")
        if np.isnan(a).any():
            raise MtadError(f"perplexity: sample {i} contains NaN log-probs")
        if (a > _LOGPROB_SLACK).any():
            raise MtadError(
                f"perplexity: sample {i} has log-probs > 0 (max {a.max():.4g}); pass natural-log "
                "probabilities (<= 0), not probabilities or negated log-probs"
            )
        out.append(a)
    return out


def perplexity(per_sample_token_logprobs: Sequence[Any]) -> float:
    """Perplexity as the MTAD paper's code reports it (spec/mtad.md §6.1).

    `per_sample_token_logprobs[s]` holds the natural-log probability that the *target* model,
    with raw softmax (no temperature, top-k or top-p), gives each generated token of sample s.

        PPL = exp( -(1/S) * sum_s mean_t log p(x_{s,t}) )

    Each sample weighs the same whatever its length (a "macro" average of per-sample mean NLL).
    That is what the paper's -21.2 % perplexity claim is computed with, so use this one to compare
    with the paper. The usual language-model definition weighs every token equally instead; that
    is `token_weighted_perplexity`. The two agree when all samples have the same length.
    Whether post-EOS tokens are included is the caller's choice (the reference code includes
    them, spec §7 item 5; our decoders truncate at EOS, so there are none).
    """
    samples = _checked_samples(per_sample_token_logprobs)
    mean_of_means = float(np.mean([a.mean() for a in samples]))
    return math.exp(-mean_of_means)


def token_weighted_perplexity(per_sample_token_logprobs: Sequence[Any]) -> float:
    """exp(-mean log-prob over all tokens of all samples): every token weighs the same ("micro").

    The standard LM-evaluation definition; longer samples count more. See `perplexity` for the
    paper's per-sample-mean variant.
    """
    samples = _checked_samples(per_sample_token_logprobs)
    total = float(sum(a.sum() for a in samples))
    count = sum(a.size for a in samples)
    return math.exp(-total / count)
