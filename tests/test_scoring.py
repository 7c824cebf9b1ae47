"""Teacher-forced scoring (mtad_trt.engine.scoring) against hand-computed log-probs and itself chunked."""

from __future__ import annotations

import numpy as np
import pytest

from mtad_trt.backends.ort import OrtRunner
from mtad_trt.backends.rows import Row
from mtad_trt.bench.quality import token_weighted_perplexity
from mtad_trt.engine.scoring import token_logprobs
from mtad_trt.folder.manifest import Manifest
from toy import BigramRunner


def test_perplexity_hand_computed():
    # Bigram toy: log p(b | a) is readable from the table, so the perplexity is known exactly.
    table = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]], np.float32))
    seq = Row(BigramRunner(table))
    lp = token_logprobs(seq, [0], [1, 1, 2])  # p(1|0)=.25, p(1|1)=.8, p(2|1)=.1
    np.testing.assert_allclose(lp, np.log([0.25, 0.8, 0.1]), rtol=1e-6)
    assert token_weighted_perplexity([lp]) == pytest.approx((0.25 * 0.8 * 0.1) ** (-1 / 3), rel=1e-6)


def test_chunked_scoring_equals_one_pass(pair_engine):
    spec = Manifest.load(pair_engine).roles["target"].spec
    seq = Row(OrtRunner(pair_engine / "target/model.onnx", spec))
    ids = [int(x) for x in np.random.default_rng(2).integers(0, spec.vocab_size, 60)]
    a = token_logprobs(seq, ids[:10], ids[10:], chunk=256)
    b = token_logprobs(seq, ids[:10], ids[10:], chunk=7)
    np.testing.assert_allclose(a, b, atol=1e-4)
