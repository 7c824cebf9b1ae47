"""Automatic prefix caching (mtad_trt.engine.prefix_cache): outputs as without it, hits counted
exactly, nothing leaked, never reused across models whose caches differ.

References are the same requests on a Pipeline with the cache off; expected hit counts are
computed here from the prompts alone (full 16-token blocks of the longest common prefix with a
prompt whose prefill finished earlier, never the last prompt token).
"""

from __future__ import annotations

import numpy as np
import pytest

from mtad_trt import Pipeline
from mtad_trt.engine.params import DecodeParams, SamplingParams
from mtad_trt.engine.prefix_cache import PrefixCache, model_key
from mtad_trt.engine.request import Request
from mtad_trt.engine.scheduler import Scheduler
from toy import BigramRunner, ToyTokenizer, random_tables

BLOCK = 16
rng = np.random.default_rng(0)
SEED = [int(t) for t in rng.integers(3, 300, 70)]  # the first request's prompt: 4 full blocks + 5


def _prompts() -> list[list[int]]:
    tail = [int(t) for t in rng.integers(3, 300, 40)]
    return [
        SEED[:40] + tail[:9],  # shares 40 tokens: 2 blocks (not block-aligned)
        SEED[:48] + tail[:12],  # shares 48: 3 blocks (aligned)
        SEED[:48] + tail[:12],  # the same prompt twice in one iteration
        SEED[:33],  # only a cached prefix: 2 blocks, then just the last token to feed
        tail[:30],  # shares nothing
        SEED[:10] + tail[10:40],  # shares less than a block
    ]


def expected_hit(prompt: list[int], earlier: list[int]) -> int:
    lcp = next((i for i, (a, b) in enumerate(zip(prompt, earlier, strict=False)) if a != b), min(len(prompt), len(earlier)))
    return BLOCK * min(lcp // BLOCK, (len(prompt) - 1) // BLOCK, (len(earlier) - 1) // BLOCK)


SETTINGS = [dict(decoder="ar"), dict(decoder="mtad", gamma=3, beam_width=3), dict(decoder="sps", gamma=3),
            dict(decoder="mmtad", gamma=2, beam_width=3), dict(decoder="mtad", gamma=4, beam_width=2),
            dict(decoder="ar")]


@pytest.fixture(scope="module")
def cached(pair_engine):
    with Pipeline.load(pair_engine, backend="ort", max_batch=8, prefix_cache_mb=64) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def uncached(pair_engine):
    with Pipeline.load(pair_engine, backend="ort", max_batch=8, prefix_cache_mb=0) as pipe:
        yield pipe


def test_greedy_outputs_equal_uncached_and_hits_are_the_shared_blocks(cached, uncached):
    common = dict(temperature=0, ignore_eos=True, max_new_tokens=24)
    prompts = _prompts()
    refs = uncached.generate(prompts, settings=SETTINGS, **common)
    cached.prefix_cache.clear()
    before = (cached.prefix_cache.queries, cached.prefix_cache.hits)
    first = cached.generate(SEED, decoder="mtad", **common)  # fills the cache
    assert first.stats.cached_tokens == 0
    assert first.token_ids == uncached.generate(SEED, decoder="mtad", **common).token_ids
    outs = cached.generate(prompts, settings=SETTINGS, **common)  # all begin in one iteration
    for i, (out, ref) in enumerate(zip(outs, refs, strict=True)):
        assert out.token_ids == ref.token_ids, f"prompt {i}"
        assert out.stats.cached_tokens == expected_hit(prompts[i], SEED), f"prompt {i}"
    queries, hits = cached.prefix_cache.queries - before[0], cached.prefix_cache.hits - before[1]
    assert queries == len(SEED) + sum(map(len, prompts))
    assert hits == sum(expected_hit(p, SEED) for p in prompts) > 0


def test_seeded_sampling_is_unchanged_by_the_cache(cached, uncached):
    common = dict(temperature=1.0, top_k=10, ignore_eos=True, max_new_tokens=20)
    per = [{**s, "seed": 40 + i} for i, s in enumerate(SETTINGS)]
    prompts = _prompts()
    refs = uncached.generate(prompts, settings=per, **common)
    cached.generate(SEED, **common)
    outs = cached.generate(prompts, settings=per, **common)
    assert [o.token_ids for o in outs] == [r.token_ids for r in refs]
    assert sum(o.stats.cached_tokens for o in outs) > 0


def test_a_prompt_queued_behind_a_long_prefill_reuses_its_blocks(pair_engine):
    """Prompts that begin after another's prefill wrote its blocks take them, in the same batch."""
    long = [int(t) for t in rng.integers(3, 300, 150)]
    with Pipeline.load(pair_engine, backend="ort", max_batch=4, prefill_chunk=32, prefix_cache_mb=64) as pipe, \
         Pipeline.load(pair_engine, backend="ort", max_batch=4, prefill_chunk=32, prefix_cache_mb=0) as ref:
        prompts = [long, long[:120] + [5, 6, 7], long + [9]]
        common = dict(temperature=0, ignore_eos=True, max_new_tokens=16, decoder="mtad")
        outs, refs = pipe.generate(prompts, **common), ref.generate(prompts, **common)
        assert [o.token_ids for o in outs] == [r.token_ids for r in refs]
        assert outs[0].stats.cached_tokens == 0 and outs[1].stats.cached_tokens > 0
        assert outs[2].stats.cached_tokens > outs[1].stats.cached_tokens


def test_cancelled_mid_prefill_leaves_a_consistent_pool(pair_engine):
    long = [int(t) for t in rng.integers(3, 300, 200)]
    with Pipeline.load(pair_engine, backend="ort", max_batch=2, prefill_chunk=32, prefix_cache_mb=64) as pipe, \
         Pipeline.load(pair_engine, backend="ort", max_batch=2, prefill_chunk=32, prefix_cache_mb=0) as ref:
        req = pipe.prepare(long, temperature=0, max_new_tokens=8, decoder="sps")
        pipe.scheduler.add(req)
        pipe.scheduler.step()
        pipe.scheduler.step()  # two prefill chunks in: some blocks stored, the prompt not finished
        req.cancelled.set()
        while not req.finished:
            pipe.scheduler.step()
        assert req.stats.finish_reason == "cancelled" and req.stats.generated_tokens == 0
        pool = pipe.prefix_cache
        assert 0 < len(pool) and pool.nbytes == sum(e.nbytes for e in pool._entries.values())  # noqa: SLF001
        out = pipe.generate(long, temperature=0, max_new_tokens=8, decoder="sps")
        assert 0 < out.stats.cached_tokens < len(long) - 1  # what was stored before the cancel
        assert out.token_ids == ref.generate(long, temperature=0, max_new_tokens=8, decoder="sps").token_ids
        assert not pipe.scheduler.running and pipe.scheduler.free == [0, 1]


def test_lru_eviction_keeps_the_pool_within_its_budget(pair_engine):
    with Pipeline.load(pair_engine, backend="ort", max_batch=1, prefix_cache_mb=0.25) as pipe:
        pool = pipe.prefix_cache
        for i in range(6):
            prompt = [int(t) for t in np.random.default_rng(100 + i).integers(3, 300, 100)]
            pipe.generate(prompt, temperature=0, max_new_tokens=2)
            assert pool.nbytes <= pool.capacity_bytes
        assert pool.evictions > 0


def test_a_cache_size_that_does_not_fit_is_refused_at_load(pair_engine, monkeypatch):
    from mtad_trt import pipeline
    from mtad_trt.errors import CapacityError

    monkeypatch.setattr(pipeline, "available_bytes", lambda device: 100 << 20)
    with pytest.raises(CapacityError, match="prefix cache of 4096 MiB does not fit"):
        Pipeline.load(pair_engine, backend="ort", prefix_cache_mb=4096)


def test_models_with_different_caches_never_share_entries():
    """Namespaces: the role and every KV shape fact (dtype included) key an entry."""
    dtab, ttab = random_tables(6, seed=1)
    a, b = BigramRunner(ttab), BigramRunner(ttab)
    b.spec.dtype = "float16"
    assert model_key("target", a) != model_key("target", b) != model_key("draft", b)
    pool = PrefixCache(1 << 20, block_size=2)
    from mtad_trt.backends.rows import Row

    row = Row(a)
    row.n = 8
    prompt = [0, 1, 2, 3, 4, 5, 0, 1, 2]
    pool.store(prompt, "target", row)
    fresh = Row(b)
    assert pool.restore(prompt, {"target": fresh}) == 0  # a float16 cache does not read float32 blocks
    same = Row(BigramRunner(ttab))
    assert pool.restore(prompt, {"target": same}) == 8


@pytest.mark.parametrize("decoder", ["mtad", "mmtad", "sps"])
def test_decoder_laws_hold_when_the_prefix_came_from_the_cache(decoder):
    """The first token's law after a cached prefix (toy bigram runners: the law depends only on the
    last prompt token, so it is known exactly) equals the law without the cache: same seeds give
    the same tokens, cached or not, for every decoder."""
    dtab, ttab = random_tables(6, seed=7)
    prompt = [1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 2]
    sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=12)
    outs = {}
    for on in (False, True):
        pool = PrefixCache(1 << 20, block_size=4) if on else None
        sched = Scheduler(BigramRunner(ttab), BigramRunner(dtab), ToyTokenizer(), set(), max_batch=2, prefix_cache=pool)
        got = []
        for seed in range(40):
            req = Request(list(prompt), SamplingParams(**{**sp.__dict__, "seed": seed}),
                          DecodeParams(decoder=decoder, gamma=3, beam_width=2))
            sched.add(req)
            while not req.finished:
                sched.step()
            assert req.stats.cached_tokens == (12 if on and seed else 0)
            got.append(req.output_ids)
        outs[on] = got
    assert outs[True] == outs[False]


def test_server_reports_cached_tokens_and_vllm_named_counters(cached, uncached):
    """Two chat requests sharing a long system prompt: the second's usage says how many prompt
    tokens came from the cache, /metrics counts queries and hits in tokens, and the answers are
    those of a server without the cache."""
    import httpx
    import openai
    from test_serve import metric

    from mtad_trt.serve import ServerSettings, ServerThread, create_app

    system = "Be careful. " * 5
    msgs = [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in ("Hi there", "Bye now")]
    answers = {}
    for name, pipe in (("cached", cached), ("uncached", uncached)):
        app = create_app(pipe, ServerSettings(model_name="tiny-pair"))
        with ServerThread(app) as url, httpx.Client(base_url=url, trust_env=False, timeout=60) as http:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, http_client=http)
            if name == "cached":
                pipe.prefix_cache.clear()
            rs = [client.chat.completions.create(model="tiny-pair", messages=m, max_tokens=12, temperature=0)
                  for m in msgs]
            answers[name] = [r.choices[0].message.content for r in rs]
            if name == "cached":
                shared = len(pipe.encode_chat(msgs[0][:1]))  # the system turn's tokens, at least
                cached_tokens = [r.usage.prompt_tokens_details.cached_tokens for r in rs]
                assert cached_tokens[0] == 0 and cached_tokens[1] >= 16 * (shared // 16) - 16 > 0
                assert metric(http, "mtad_trt:prefix_cache_hits_total") == sum(cached_tokens)
                assert metric(http, "mtad_trt:prefix_cache_queries_total") == sum(r.usage.prompt_tokens for r in rs)
            else:
                assert metric(http, "mtad_trt:prefix_cache_queries_total") == 0  # off: nothing looked up
    assert answers["cached"] == answers["uncached"]


def test_identical_prompts_in_one_burst_share_one_prefill(cached, uncached):
    """n choices of one prompt (or a burst of identical prompts): the first computes the blocks,
    the others wait for them instead of computing them again in the same call."""
    prompt = [int(t) for t in np.random.default_rng(21).integers(3, 300, 70)]
    cached.prefix_cache.clear()
    common = dict(temperature=1.0, top_k=10, ignore_eos=True, max_new_tokens=10, decoder="mtad")
    per = [{"seed": i} for i in range(4)]
    outs = cached.generate([prompt] * 4, settings=per, **common)
    refs = uncached.generate([prompt] * 4, settings=per, **common)
    assert [o.token_ids for o in outs] == [r.token_ids for r in refs]
    assert [o.stats.cached_tokens for o in outs] == [0, 64, 64, 64]
