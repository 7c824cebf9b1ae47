"""Output quality: perplexity under the target, as the bench reports it.

Log-probs come from `mtad_trt.engine.scoring` (teacher-forced, raw softmax), which also defines the
token-weighted perplexity the export's quantization check uses (re-exported here); this module
adds the paper's per-sample variant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mtad_trt.engine.scoring import checked_samples, token_weighted_perplexity

__all__ = ["perplexity", "token_weighted_perplexity"]


def perplexity(per_sample_token_logprobs: Sequence[Any]) -> float:
    """Perplexity as the MTAD paper's code reports it (docs/algorithm.md §6.1).

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
    samples = checked_samples(per_sample_token_logprobs)
    mean_of_means = float(np.mean([a.mean() for a in samples]))
    return math.exp(-mean_of_means)
