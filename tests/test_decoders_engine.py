"""Decoders on real exported (tiny) engines, against transformers as the independent reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

PROMPTS = ["def fib(n):", "The quick brown fox", "import numpy as np\n"]


@pytest.fixture(scope="module")
def hf_target(qwen_target):
    return AutoModelForCausalLM.from_pretrained(str(qwen_target), dtype=torch.float32).eval()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ar_greedy_equals_transformers(pair_pipeline, hf_target, prompt):
    ids = pair_pipeline.encode(prompt)
    with torch.no_grad():
        ref = hf_target.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(ids):].tolist()
    out = pair_pipeline.generate(ids, decoder="ar", temperature=0, max_new_tokens=30, ignore_eos=True)
    assert out.token_ids == ref


@pytest.mark.parametrize("decoder", ["sps", "mtad", "mmtad"])
@pytest.mark.parametrize("gamma,beam", [(1, 1), (3, 2), (4, 4)])
def test_greedy_speculative_equals_ar(pair_pipeline, decoder, gamma, beam):
    """P1 on real graphs: the cache slots, compaction and masks must all be right for this to hold."""
    for prompt in PROMPTS[:2]:
        ref = pair_pipeline.generate(prompt, decoder="ar", temperature=0, max_new_tokens=40, ignore_eos=True)
        out = pair_pipeline.generate(prompt, decoder=decoder, temperature=0, max_new_tokens=40, ignore_eos=True,
                                     gamma=gamma, beam_width=beam, threshold=0.5)
        assert out.token_ids == ref.token_ids


@pytest.mark.parametrize("decoder", ["mtad", "mmtad", "sps"])
def test_self_draft_accepts_all_on_real_graphs(self_pipeline, decoder):
    """P4: draft ≡ target; incremental vs parallel forwards differ only by float noise (τ=0.99)."""
    out = self_pipeline.generate("def fib(n):", decoder=decoder, temperature=1.0, top_k=10, top_p=0.9, seed=0,
                                 max_new_tokens=41, gamma=4, beam_width=3, threshold=0.99, ignore_eos=True)
    s = out.stats
    assert s.acceptance_rate == 1.0
    assert s.generated_tokens == 41 and s.target_calls == s.iterations == 9  # 5 tokens per target call


def test_greedy_equals_ar_across_bucket_growth(pair_pipeline):
    """Crossing the 128-slot bucket boundary re-lays the cache out; output must not change."""
    prompt = "Once upon a time " * 12
    ref = pair_pipeline.generate(prompt, decoder="ar", temperature=0, max_new_tokens=100, ignore_eos=True)
    assert len(ref.prompt_ids) + 100 > 128  # the cache grew past its first bucket during the request
    assert pair_pipeline.target.bucket == 128  # and shrank back once no request ran
    out = pair_pipeline.generate(prompt, decoder="mmtad", temperature=0, max_new_tokens=100, ignore_eos=True)
    assert out.token_ids == ref.token_ids


def test_stop_strings_and_eos(pair_pipeline):
    full = pair_pipeline.generate("def fib(n):", decoder="ar", temperature=0, max_new_tokens=30, ignore_eos=True)
    stop = full.text[5:8]
    assert stop
    cut = pair_pipeline.generate("def fib(n):", decoder="mtad", temperature=0, max_new_tokens=30, stop=[stop])
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"
    eos = full.token_ids[3]
    out = pair_pipeline.generate("def fib(n):", decoder="mmtad", temperature=0, max_new_tokens=30,
                                 stop_token_ids=[eos], ignore_eos=True)
    assert out.token_ids == full.token_ids[: full.token_ids.index(eos) + 1] and out.finish_reason == "stop"


def test_streaming_matches_generate(pair_pipeline):
    out = pair_pipeline.generate("import numpy", decoder="mtad", temperature=0.8, seed=3, max_new_tokens=25)
    pieces = list(pair_pipeline.stream("import numpy", decoder="mtad", temperature=0.8, seed=3, max_new_tokens=25))
    assert "".join(p.text for p in pieces) == out.text
    assert [t for p in pieces for t in p.token_ids] == out.token_ids


def test_seeded_sampling_is_reproducible(pair_pipeline):
    a = pair_pipeline.generate("hello", decoder="mmtad", seed=7, max_new_tokens=20)
    b = pair_pipeline.generate("hello", decoder="mmtad", seed=7, max_new_tokens=20)
    assert a.token_ids == b.token_ids


def test_cancel_midway_then_reuse(pair_pipeline):
    gen = pair_pipeline.stream("def fib(n):", decoder="mtad", temperature=0, max_new_tokens=50, ignore_eos=True)
    next(gen)
    gen.close()  # the server does this when a client disconnects
    ref = pair_pipeline.generate("x = 1", decoder="ar", temperature=0, max_new_tokens=10)
    again = pair_pipeline.generate("x = 1", decoder="mtad", temperature=0, max_new_tokens=10)
    assert again.token_ids == ref.token_ids


@pytest.fixture(scope="module")
def headless_pipeline(tiny_dir, qwen_draft, qwen_target):
    """The same pair exported without the top-k head: the full-logits path (what old folders use)."""
    from mtad_trt import Pipeline
    from mtad_trt.export.pair import export_pair

    out = tiny_dir / "engines" / "pair-headless"
    if not out.exists():
        export_pair(str(qwen_draft), str(qwen_target), out, max_seq_len=256, topk_head=0)
    with Pipeline.load(out, backend="ort") as pipe:
        yield pipe


@pytest.mark.parametrize("decoder", ["ar", "sps", "mtad", "mmtad"])
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_k=10, top_p=0.9, seed=3),
                                      dict(temperature=0.7, top_k=40, top_p=1.0, seed=5)])
def test_topk_head_gives_the_full_logits_tokens(pair_pipeline, headless_pipeline, decoder, sampling):
    """With the head, top-k sampling, greedy and greedy beam ranking never read the full logits;
    the tokens must be those of the full-logits path, seed for seed."""
    assert pair_pipeline.target.spec.topk_head == 64 and headless_pipeline.target.spec.topk_head == 0
    for prompt in PROMPTS[:2]:
        a = pair_pipeline.generate(prompt, decoder=decoder, max_new_tokens=30, ignore_eos=True, gamma=3,
                                   beam_width=3, **sampling)
        b = headless_pipeline.generate(prompt, decoder=decoder, max_new_tokens=30, ignore_eos=True, gamma=3,
                                       beam_width=3, **sampling)
        assert a.token_ids == b.token_ids


def test_topk_head_is_not_used_beyond_its_width(pair_pipeline, monkeypatch):
    """top_k above the head's width (or 0) must read the full logits: poisoning the head must not matter."""
    from mtad_trt.contract import StepOut

    ref = pair_pipeline.generate("def fib(n):", decoder="sps", temperature=1.0, top_k=0, top_p=0.9, seed=1,
                                 max_new_tokens=20, ignore_eos=True)
    real = StepOut.__init__

    def poisoned(self, logits=None, fetch=None, top=None, vocab=0):
        if top is not None:
            top = tuple(np.full_like(a, 0) for a in top)
        real(self, logits, fetch, top, vocab)

    monkeypatch.setattr(StepOut, "__init__", poisoned)
    out = pair_pipeline.generate("def fib(n):", decoder="sps", temperature=1.0, top_k=0, top_p=0.9, seed=1,
                                 max_new_tokens=20, ignore_eos=True)
    assert out.token_ids == ref.token_ids
    wide = pair_pipeline.generate("def fib(n):", decoder="ar", temperature=1.0, top_k=100, top_p=1.0, seed=1,
                                  max_new_tokens=20, ignore_eos=True)
    monkeypatch.undo()
    assert wide.token_ids == pair_pipeline.generate("def fib(n):", decoder="ar", temperature=1.0, top_k=100, top_p=1.0,
                                                    seed=1, max_new_tokens=20, ignore_eos=True).token_ids
