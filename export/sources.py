"""Where a model comes from: a Hugging Face folder, a GGUF file, or a named registry model.

Loading is the slow, memory-hungry part of export, so it happens once per model and the pair is
checked for a shared tokenizer *before* any model is loaded.
"""

from __future__ import annotations

from mtad_trt.errors import MtadError
from mtad_trt.folder.checkpoint import Checkpoint, load_config, load_hf_tokenizer, load_model, open_path

__all__ = ["Checkpoint", "load_config", "load_hf_tokenizer", "load_model", "resolve", "tokenizer_difference"]


def resolve(spec: str) -> Checkpoint:
    """Turn a user's PATH-or-name argument into a Checkpoint, with a clear error for anything else."""
    found = open_path(spec)
    if found is not None:
        return found
    from mtad_trt.export import registry

    if spec in registry.DEFAULT_MODELS:
        return Checkpoint("hf", registry.resolve(spec), spec)
    names = ", ".join(sorted(registry.DEFAULT_MODELS))
    raise MtadError(f"no such model: {spec} (not a path; named models: {names})")


def tokenizer_difference(a, b) -> str | None:
    """None when two tokenizers encode identically; else a message naming what differs.

    Draft and target exchange token ids, so anything short of the same vocabulary, the same
    special tokens and the same encoding of text is refused.
    """
    va, vb = a.get_vocab(), b.get_vocab()
    if len(va) != len(vb):
        return f"vocabulary sizes differ ({len(va)} vs {len(vb)})"
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()))[:3]
        return f"vocabularies differ (e.g. {diff})"
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(a, attr, None) != getattr(b, attr, None):
            return f"{attr} differs ({getattr(a, attr, None)} vs {getattr(b, attr, None)})"
    probe = "def f(x):\n    return x * 2  # héllo, 世界 <|im_end|>"
    if a.encode(probe) != b.encode(probe):
        return "the same text encodes to different ids (different merges or normalisation)"
    return None
