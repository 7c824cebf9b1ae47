"""Log-probabilities of emitted and prompt tokens (mtad_trt.engine.logprobs) against the reference:
`torch.log_softmax` of transformers' logits on the same checkpoint, for every decoder — tokens
accepted from a draft block and the bonus token included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtad_trt import Pipeline
from mtad_trt.errors import MtadError

PROMPT = [5, 17, 42, 99, 3, 250, 61, 7, 88, 140, 12, 33]
DECODERS = [dict(decoder="ar"), dict(decoder="sps", gamma=3), dict(decoder="mtad", gamma=4, beam_width=3),
            dict(decoder="mmtad", gamma=3, beam_width=3)]


@pytest.fixture(scope="module")
def reference(qwen_target):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(qwen_target), dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> np.ndarray:
        """[len(ids), V]: row i is log p(. | ids[:i+1])."""
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits.double(), -1).numpy()

    return logprobs


@pytest.mark.parametrize("settings", DECODERS, ids=lambda s: s["decoder"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("engine", ["pair", "self"])
def test_emitted_and_prompt_logprobs_equal_transformers(request, reference, settings, temperature, engine):
    """On `self` (draft = target) drafts are accepted, so accepted block tokens and bonus tokens
    both occur; on `pair` (two different models) rejections and bonus tokens dominate."""
    pipe = request.getfixturevalue(f"{engine}_pipeline")
    out = pipe.generate(PROMPT, max_new_tokens=24, ignore_eos=True, temperature=temperature, seed=3,
                                 logprobs=5, prompt_logprobs=2, **settings)
    ids = PROMPT + out.token_ids
    ref = reference(ids)
    assert len(out.logprobs) == len(out.token_ids) == 24
    for i, lp in enumerate(out.logprobs):
        row = ref[len(PROMPT) - 1 + i]
        assert lp.token == out.token_ids[i]
        assert abs(lp.logprob - row[lp.token]) <= 1e-4, (i, lp.logprob, row[lp.token])
        top_ids = [t for t, _ in lp.top]
        expect = np.argsort(-row, kind="stable")[:5]
        assert np.allclose([v for _, v in lp.top], row[expect], atol=1e-4)
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        if row[lp.token] >= row[expect[-1]] + 1e-3:
            assert lp.token in top_ids  # the emitted token is listed when it is among the k largest
    if settings["decoder"] != "ar" and engine == "self":
        assert out.stats.accepted_tokens > 0  # some of those tokens came from accepted draft blocks
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(PROMPT)
    for i, lp in enumerate(out.prompt_logprobs[1:], start=1):
        assert lp.token == PROMPT[i] and abs(lp.logprob - ref[i - 1][PROMPT[i]]) <= 1e-4
        assert len(lp.top) == 2


def test_scoring_a_prompt_alone_with_max_new_tokens_zero(pair_pipeline, reference):
    """Pure scoring (what a harness's log-likelihood request is): prefill only, chunked like any
    prefill, no draft, nothing generated; equals teacher-forced `Pipeline.score`."""
    long = [int(t) for t in np.random.default_rng(4).integers(3, 300, 150)]  # several 64-token scoring chunks
    out = pair_pipeline.generate(long, max_new_tokens=0, prompt_logprobs=0, decoder="mtad")
    assert out.token_ids == [] and out.finish_reason == "length" and out.stats.prefill_calls >= 3
    got = np.array([lp.logprob for lp in out.prompt_logprobs[1:]])
    np.testing.assert_allclose(got, [reference(long)[i - 1][long[i]] for i in range(1, len(long))], atol=1e-4)
    np.testing.assert_allclose(got, pair_pipeline.score(long[:1], long[1:], cut_at_eos=False), atol=1e-5)


def test_limits_and_refusals(pair_pipeline):
    with pytest.raises(MtadError, match="logprobs must be between 0 and 20") as e:
        pair_pipeline.prepare(PROMPT, logprobs=21)
    assert e.value.param == "logprobs"
    with pytest.raises(MtadError, match="prompt_logprobs must be between 0 and 20"):
        pair_pipeline.prepare(PROMPT, prompt_logprobs=-1)
    with pytest.raises(MtadError, match="0 only when scoring the prompt"):
        pair_pipeline.prepare(PROMPT, max_new_tokens=0)


def test_prompt_logprobs_bypass_the_prefix_cache(pair_engine):
    """A cached prefix has no logits: a request that wants its prompt's log-probs prefills it all."""
    with Pipeline.load(pair_engine, backend="ort", prefix_cache_mb=16) as pipe:
        long = [int(t) for t in np.random.default_rng(8).integers(3, 300, 60)]
        pipe.generate(long, max_new_tokens=2, temperature=0)
        out = pipe.generate(long, max_new_tokens=2, temperature=0, prompt_logprobs=1)
        assert out.stats.cached_tokens == 0 and len(out.prompt_logprobs) == len(long)
        again = pipe.generate(long, max_new_tokens=2, temperature=0)
        assert again.stats.cached_tokens == 48


def _processed_reference(logits_row: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """temperature, then top-k, then top-p (the smallest set of most likely tokens whose mass
    reaches top_p), in plain numpy; log of the result (-inf outside the support)."""
    x = logits_row.astype(np.float64) / temperature
    if top_k:
        x = np.where(x >= np.sort(x)[-top_k], x, -np.inf)
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.cumsum(p[order]) - p[order] < top_p  # a token is kept while the mass before it is < top_p
    q = np.zeros_like(p)
    q[order[keep]] = p[order[keep]]
    q /= q.sum()
    with np.errstate(divide="ignore"):
        return np.log(q)


@pytest.mark.parametrize("settings", DECODERS, ids=lambda s: s["decoder"])
def test_processed_logprobs_are_the_distribution_each_token_was_drawn_from(self_pipeline, qwen_target, settings):
    """--logprobs-mode processed: the target's row after temperature, top-k and top-p, from an
    independent numpy reading of transformers' logits; every drawn token lies in that support, and
    the mode changes what is reported, never what is sampled."""
    from transformers import AutoModelForCausalLM

    sampling = dict(temperature=0.7, top_k=6, top_p=0.8, seed=5, max_new_tokens=16, ignore_eos=True, logprobs=8)
    out = self_pipeline.generate(PROMPT, logprobs_mode="processed", **sampling, **settings)
    raw = self_pipeline.generate(PROMPT, **sampling, **settings)
    assert out.token_ids == raw.token_ids
    model = AutoModelForCausalLM.from_pretrained(str(qwen_target), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + out.token_ids])).logits[0].numpy()
    for i, lp in enumerate(out.logprobs):
        ref = _processed_reference(logits[len(PROMPT) - 1 + i], 0.7, 6, 0.8)
        assert lp.logprob > -np.inf and abs(lp.logprob - ref[lp.token]) <= 1e-4, (i, lp.logprob, ref[lp.token])
        support = int(np.isfinite(ref).sum())
        got = [v for _, v in lp.top]
        assert len(got) == 8 and got == sorted(got, reverse=True)
        np.testing.assert_allclose(got[:support], np.sort(ref)[::-1][:support], atol=1e-4)
        assert all(v == -np.inf for v in got[support:])  # past the support (the server sends its floor)
        if support <= 8:  # the whole support is listed: its probabilities sum to 1
            assert abs(np.logaddexp.reduce(got[:support])) <= 1e-6
    greedy = self_pipeline.generate(PROMPT, logprobs_mode="processed", temperature=0, max_new_tokens=4,
                                    ignore_eos=True, logprobs=2, **settings)
    assert [lp.logprob for lp in greedy.logprobs] == [0.0] * 4  # one-hot: the drawn token is certain


def test_logprobs_mode_is_checked(pair_pipeline):
    with pytest.raises(MtadError, match="logprobs_mode must be one of raw, processed") as e:
        pair_pipeline.prepare(PROMPT, logprobs=1, logprobs_mode="softmax")
    assert e.value.param == "logprobs_mode"
