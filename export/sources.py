"""Where a model comes from: a Hugging Face folder, a GGUF file, or a named default model.

Loading is the slow, memory-hungry part of export, so it happens once per model and the pair is
checked for a shared tokenizer *before* any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mtad_trt.errors import MtadError


@dataclass
class Source:
    kind: str  # "hf" | "gguf"
    path: Path  # the folder (hf) or the .gguf file
    name: str  # what the user typed

    @property
    def folder(self) -> Path:
        return self.path if self.kind == "hf" else self.path.parent

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "given": self.name}


def resolve(spec: str) -> Source:
    """Turn a user's PATH argument into a Source, with a clear error for anything else."""
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return Source("gguf", ggufs[0], spec)
            raise MtadError(f"{p} is not a Hugging Face model folder (no config.json) and holds no single .gguf file")
        return Source("hf", p, spec)
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            with open(p, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise MtadError(f"{p} is not a GGUF file (bad magic bytes)")
            return Source("gguf", p, spec)
        raise MtadError(f"{p} is neither a model folder nor a .gguf file")
    from mtad_trt.export import defaults

    if spec in defaults.DEFAULT_MODELS:
        return Source("hf", defaults.resolve(spec), spec)
    names = ", ".join(sorted(defaults.DEFAULT_MODELS))
    raise MtadError(f"no such model: {spec} (not a path; named models: {names})")


def load_tokenizer(src: Source):
    from transformers import AutoTokenizer

    try:
        if src.kind == "gguf":
            return AutoTokenizer.from_pretrained(str(src.folder), gguf_file=src.path.name)
        return AutoTokenizer.from_pretrained(str(src.path))
    except Exception as e:  # transformers raises many kinds; the user needs one line
        raise MtadError(f"cannot load a tokenizer from {src.path}: {type(e).__name__}: {e}") from None


def load_model(src: Source, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    kwargs = {"dtype": torch_dtype, "attn_implementation": "eager"}
    try:
        if src.kind == "gguf":
            model = AutoModelForCausalLM.from_pretrained(str(src.folder), gguf_file=src.path.name, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(src.path), **kwargs)
    except Exception as e:
        raise MtadError(f"cannot load a causal LM from {src.path}: {type(e).__name__}: {e}") from None
    return model.eval()


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
