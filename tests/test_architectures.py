"""The architecture matrix (docs/architectures.md): standard-cache families transformers ships, as
tiny random models built here, each either exported with parity across S buckets and greedy
decoding equal to transformers' own `generate` past its sliding window, or refused at export with
one line naming the unsupported feature.

The reference is always transformers with eager attention, never the wrapper. Each export takes
~20 s (the dynamo tracer), so the supported families are marked slow.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mtad_trt import Pipeline
from mtad_trt.errors import MtadError
from mtad_trt.export.pair import export_pair
from tiny import arch_config, save_arch

WINDOW = 16  # sliding window of the tiny models
CAPACITY = 256  # S buckets 128 and 256
PROMPT, NEW = 40, 150  # greedy run: ends at position 189, far past the window, in the 256 bucket

SUPPORTED = ["llama", "qwen2", "qwen2-swa", "mistral", "gemma2", "gemma3", "phi3", "qwen3", "qwen3-swa",
             "starcoder2"]


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.int64))
    return out[0, len(ids):].tolist()


def _sliding(arch: str) -> bool:
    cfg, _ = arch_config(arch, WINDOW)
    return getattr(cfg, "sliding_window", None) is not None and (
        "sliding_attention" in (getattr(cfg, "layer_types", None) or ["sliding_attention"]))


@pytest.mark.slow
@pytest.mark.parametrize("arch", SUPPORTED)
def test_family_exports_with_parity_and_greedy_equal_to_transformers(arch, tokenizer, tmp_path):
    folder = save_arch(tmp_path / "model", arch, tokenizer, window=WINDOW)
    engine = tmp_path / "engine"
    pair = arch == "gemma3"  # one sliding family also runs the speculative decoders (trees, beams)
    m = export_pair(str(folder) if pair else None, str(folder), engine, max_seq_len=CAPACITY)
    entry = m.roles["target"]
    parity = entry.parity
    assert parity["passed"] and parity["worst"] <= 1e-4, parity
    assert parity["long"]["bucket"] == CAPACITY and parity["long"]["largest_bucket"]
    assert parity["long"]["past_window"]
    sliding = _sliding(arch)
    assert (entry.spec.sliding_window == WINDOW) == sliding and entry.spec.has_sliding_layers == sliding
    if sliding:
        assert parity["long"]["context"] > WINDOW and parity["where"]["long_decode"]["position"] > WINDOW

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ids = [int(x) for x in np.random.default_rng(7).integers(3, len(tokenizer), PROMPT)]
    ref = _hf_greedy(model, ids, NEW)
    with Pipeline.load(engine, backend="ort") as pipe:
        got = pipe.generate(ids, decoder="ar", temperature=0, max_new_tokens=NEW, ignore_eos=True)
        assert got.token_ids == ref
        if pair:
            for decoder in ("sps", "mtad", "mmtad"):
                out = pipe.generate(ids, decoder=decoder, temperature=0, max_new_tokens=NEW, ignore_eos=True,
                                    gamma=4, beam_width=3)
                assert out.token_ids == ref, decoder
    if sliding:  # the comparison sees the window: without it transformers decodes differently
        model.config.sliding_window = 10**6
        assert _hf_greedy(model, ids, NEW) != ref


@pytest.mark.parametrize("arch,max_seq_len,line", [
    ("llama-dynamic-rope", 256, "target: cannot export: LlamaForCausalLM uses dynamic NTK rope scaling, which "
     "rescales its frequencies with the sequence length at run time; a static graph cannot reproduce it"),
    ("phi3-longrope", 256, "target: cannot export: Phi3ForCausalLM uses LongRoPE scaling, which switches to its "
     "long factors past 128 positions (original_max_position_embeddings); a static graph cannot, so export "
     "with --max-seq-len 128 or less"),
])
def test_unsupported_feature_is_refused_in_one_line(arch, max_seq_len, line, tokenizer, tmp_path):
    folder = save_arch(tmp_path / "model", arch, tokenizer, window=WINDOW)
    out = tmp_path / "engines" / "e"
    with pytest.raises(MtadError) as err:
        export_pair(None, str(folder), out, max_seq_len=max_seq_len)
    assert str(err.value) == line
    assert not out.exists() and list((tmp_path / "engines").iterdir()) == []


@pytest.mark.slow
def test_longrope_within_its_original_length_exports(tokenizer, tmp_path):
    """LongRoPE never switches factors inside 128 positions: there the short factors are pinned in
    the graph, and the export matches transformers (which uses the short factors too)."""
    folder = save_arch(tmp_path / "model", "phi3-longrope", tokenizer, window=WINDOW)
    m = export_pair(None, str(folder), tmp_path / "engine", max_seq_len=128)
    parity = m.roles["target"].parity
    assert parity["passed"] and parity["worst"] <= 1e-4 and parity["long"]["past_window"]
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ids = [int(x) for x in np.random.default_rng(3).integers(3, len(tokenizer), 30)]
    ref = _hf_greedy(model, ids, 90)
    with Pipeline.load(tmp_path / "engine", backend="ort") as pipe:
        assert pipe.generate(ids, decoder="ar", temperature=0, max_new_tokens=90, ignore_eos=True).token_ids == ref
