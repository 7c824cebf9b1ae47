"""GGUF -> Hugging Face folder conversion (export/convert.py): what the folder must hold."""

from __future__ import annotations

import json

import pytest

from mtad_trt.export.convert import complete_config, tensors_for_saving


@pytest.mark.parametrize("tie", [True, False])
def test_tensors_for_saving_handles_tied_embeddings(tie):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg)
    tensors = tensors_for_saving(model)
    assert ("lm_head.weight" in tensors) is not tie
    ptrs = [t.untyped_storage().data_ptr() for t in tensors.values()]
    assert len(ptrs) == len(set(ptrs))  # safetensors accepts it
    for k, t in tensors.items():
        assert torch.equal(t, model.state_dict()[k])




def test_complete_config_adds_what_save_pretrained_writes(tmp_path):
    """A folder converted by an older version (no `architectures`, no generation config) is completed,
    and transformers then loads config and generation config with nothing missing."""
    from transformers import AutoConfig, GenerationConfig, Qwen2Config

    Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, eos_token_id=3).save_pretrained(str(tmp_path))
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("architectures", None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    complete_config(tmp_path)
    assert AutoConfig.from_pretrained(str(tmp_path)).architectures == ["Qwen2ForCausalLM"]
    assert GenerationConfig.from_pretrained(str(tmp_path)).eos_token_id == 3
    complete_config(tmp_path)  # idempotent
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
