"""GGUF -> Hugging Face folder conversion (export/convert.py): what the folder must hold.

The conversion streams (one tensor at a time through GGUFSource) and checks the folder tensor by
tensor, so the tests here check the other way round what it no longer computes: the folder loads in
transformers with nothing missing and gives the logits of transformers' own GGUF load.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_gguf_source import real_gguf, write_tiny_gguf

from mtad_trt.errors import MtadError
from mtad_trt.export.convert import MARKER, complete_config, convert_gguf, is_complete

SOURCE = {"name": "tiny", "gguf_sha256": "0" * 64}


def assert_folder_equals_gguf_load(folder: Path, gguf: Path, text: str, tolerance: float) -> None:
    """The folder loads cleanly and its logits equal those of transformers' GGUF load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    assert ours.dtype == torch.float32 and type(ours) is type(ref)
    ids = AutoTokenizer.from_pretrained(str(folder))(text, return_tensors="pt").input_ids
    assert ids.shape[1] > 3
    with torch.no_grad():
        diff = (ours.eval()(ids).logits - ref.eval()(ids).logits).abs().max().item()
    assert diff <= tolerance, diff


@pytest.mark.parametrize(("arch", "tied"), [("llama", True), ("qwen2", False)])
def test_tiny_gguf_converts_to_a_folder_that_loads_with_the_gguf_logits(tmp_path, arch, tied):
    from safetensors import safe_open

    gguf = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, tied, "Q8_0")
    dest = tmp_path / "models" / "tiny"
    lines = []
    marker = convert_gguf(SOURCE, gguf, dest, lines.append)
    assert is_complete(dest, SOURCE["gguf_sha256"])
    assert [p.name for p in dest.parent.iterdir()] == ["tiny"]  # the temporary folder was renamed
    assert json.loads((dest / MARKER).read_text()) == marker
    assert marker["tied_embeddings"] is tied and marker["max_abs_weight_diff"] == 0.0
    assert any("tensor by tensor" in line for line in lines)
    with safe_open(str(dest / "model.safetensors"), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert all(t.dtype == np.float32 for t in tensors.values())
    assert ("lm_head.weight" in tensors) is not tied  # tied: re-tied by from_pretrained, as HF checkpoints do
    assert marker["parameters"] == sum(t.size for t in tensors.values())
    assert_folder_equals_gguf_load(dest, gguf, "abc abd Bac", 0.0)


def test_a_tensor_that_differs_on_the_check_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    """Negative control: the check re-reads both sides; a GGUF tensor that reads differently the
    second time (as a mis-written one would) refuses the conversion, with no folder left behind."""
    from mtad_trt.export.gguf_source import GGUFSource

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    real = GGUFSource.read

    def read(self, name, rows=None):
        x = real(self, name, rows)
        return x + 1e-3 if rows is not None and name == "model.layers.1.mlp.down_proj.weight" else x

    monkeypatch.setattr(GGUFSource, "read", read)
    dest = tmp_path / "models" / "tiny"
    with pytest.raises(MtadError, match=r"tensor model\.layers\.1\.mlp\.down_proj\.weight .* differs .* refused"):
        convert_gguf(SOURCE, gguf, dest, None)
    assert list((tmp_path / "models").iterdir()) == []


def test_progress_lines_count_tensors_and_estimate_by_size():
    from mtad_trt.export.convert import _ticker

    lines = []
    tick = _ticker(lines.append, "written", [10, 30, 60], every_s=0)
    for i in (1, 2, 3):
        tick(i)
    assert [ln.split(" in ")[0] for ln in lines] == ["written 1/3 tensors", "written 2/3 tensors"]  # none at the end
    assert all(ln.endswith(" s left") for ln in lines)


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


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_converted_folder_gives_the_gguf_logits(tmp_path):
    """The real model, converted into a temporary folder (the cache's folder is left alone)."""
    gguf = real_gguf("smollm2-135m")
    dest = tmp_path / "smollm2-135m"
    marker = convert_gguf({"name": "smollm2-135m", "gguf_sha256": "test"}, gguf, dest, None)
    assert marker["tied_embeddings"] is True and marker["parameters"] == 134_515_008
    assert_folder_equals_gguf_load(dest, gguf, 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""', 1e-4)
