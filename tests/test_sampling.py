"""Logit processing (proc_T) and sampling against plain reference computations."""

from __future__ import annotations

import numpy as np
import pytest

from mtad_trt.engine.params import SamplingParams
from mtad_trt.engine.sampling import process, sample_many


def reference_process(logits, t, k, p):
    """The reference code's norm_logits, written with plain sorting."""
    x = logits / t
    if k:
        kth = np.sort(x)[::-1][k - 1]
        x = np.where(x < kth, -np.inf, x)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    remove = cum > p
    remove[1:] = remove[:-1].copy()
    remove[0] = False
    probs[order[remove]] = 0
    return probs / probs.sum()


@pytest.mark.parametrize("t,k,p", [(1.0, 10, 0.9), (0.7, 0, 0.5), (1.3, 3, 1.0), (1.0, 50, 0.95)])
def test_process_matches_reference(t, k, p):
    rng = np.random.default_rng(1)
    for _ in range(20):
        logits = rng.normal(0, 3, 64).astype(np.float32)
        got = process(logits, SamplingParams(temperature=t, top_k=k, top_p=p)).dense()[0]
        np.testing.assert_allclose(got, reference_process(logits.astype(np.float64), t, k, p), atol=1e-12)


def test_top_p_keeps_the_crossing_token_and_at_least_one():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    got = process(logits, SamplingParams(temperature=1, top_k=0, top_p=0.6)).dense()[0]
    assert (got > 0).tolist() == [True, True, False, False]
    got = process(logits, SamplingParams(temperature=1, top_k=0, top_p=0.01)).dense()[0]
    assert (got > 0).tolist() == [True, False, False, False]


def test_greedy_is_one_hot_and_sampling_follows_probs():
    logits = np.array([[0.0, 2.0, 1.0]])
    assert process(logits, SamplingParams(temperature=0)).dense().tolist() == [[0, 1, 0]]
    probs = np.array([0.2, 0.5, 0.3])
    draws = sample_many(probs, 60000, np.random.default_rng(0))
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / 60000, probs, atol=0.01)


def test_process_ties_at_the_kth_logit_are_kept():
    logits = np.array([3.0, 2.0, 2.0, 2.0, 1.0, 0.0])
    got = process(logits, SamplingParams(temperature=1, top_k=2, top_p=1.0)).dense()[0]
    assert (got > 0).tolist() == [True, True, True, True, False, False]
    np.testing.assert_allclose(got, reference_process(logits, 1.0, 2, 1.0), atol=1e-12)


def test_process_batched_rows_match_single_rows():
    logits = np.random.default_rng(3).normal(0, 2, (5, 300)).astype(np.float32)
    sp = SamplingParams(temperature=0.8, top_k=10, top_p=0.9)
    np.testing.assert_allclose(process(logits, sp).dense(), np.concatenate([process(r, sp).dense() for r in logits]),
                               atol=1e-12)
