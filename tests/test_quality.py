"""Perplexity, the paper's and the token-weighted one, against hand-computed values (mtad_trt.bench.quality)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mtad_trt.bench.quality import perplexity, token_weighted_perplexity
from mtad_trt.errors import MtadError

LN2 = math.log(2.0)


def test_perplexity_is_exp_of_minus_mean_of_per_sample_means():
    # sample A: two tokens with p = 1/2 -> mean log p = -ln2
    # sample B: one token with p = 1/4  -> mean log p = -2 ln2
    # mean over samples = -1.5 ln2 -> PPL = 2^1.5
    samples = [np.log([0.5, 0.5]), np.log([0.25])]
    assert perplexity(samples) == pytest.approx(2**1.5, rel=1e-12)


def test_token_weighted_perplexity_weighs_tokens_not_samples():
    # all three tokens: (-ln2 - ln2 - 2 ln2) / 3 = -(4/3) ln2 -> PPL = 2^(4/3)
    samples = [np.log([0.5, 0.5]), np.log([0.25])]
    assert token_weighted_perplexity(samples) == pytest.approx(2 ** (4 / 3), rel=1e-12)


def test_perplexity_variants_agree_for_equal_lengths_and_accept_lists():
    samples = [[-LN2, -2 * LN2], [-3 * LN2, -LN2]]
    assert perplexity(samples) == pytest.approx(token_weighted_perplexity(samples))
    assert perplexity(samples) == pytest.approx(2 ** (7 / 4))


def test_perplexity_of_certain_tokens_is_one():
    assert perplexity([np.zeros(5)]) == 1.0


@pytest.mark.parametrize(
    "bad, msg",
    [
        ([], "at least one sample"),
        ([np.array([])], "no tokens"),
        ([np.array([0.5, 0.2])], "log-probs > 0"),  # probabilities passed by mistake
        ([np.array([np.nan])], "NaN"),
    ],
)
def test_perplexity_refuses_bad_input(bad, msg):
    with pytest.raises(MtadError, match=msg):
        perplexity(bad)
