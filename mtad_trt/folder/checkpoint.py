"""Hugging Face checkpoints on disk: a model folder or a GGUF file, and how to load them.

The export stage loads the model it traces from here; the torch runner loads the same weights to
run them (the contract wrapper needs the model itself, not its graph); bench peers load it too.
Named models (the offline registry) are resolved by the export stage, which records the local
path in the manifest, so the runtime only ever sees paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mtad_trt.errors import MtadError


@dataclass
class Checkpoint:
    kind: str  # "hf" | "gguf"
    path: Path  # the folder (hf) or the .gguf file
    name: str  # what the user typed

    @property
    def folder(self) -> Path:
        return self.path if self.kind == "hf" else self.path.parent

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "given": self.name}


def open_path(spec: str) -> Checkpoint | None:
    """The checkpoint at a folder or .gguf path; None when nothing exists there; an error for
    anything else that exists."""
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return Checkpoint("gguf", ggufs[0], spec)
            raise MtadError(f"{p} is not a Hugging Face model folder (no config.json) and holds no single .gguf file")
        return Checkpoint("hf", p, spec)
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            with open(p, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise MtadError(f"{p} is not a GGUF file (bad magic bytes)")
            return Checkpoint("gguf", p, spec)
        raise MtadError(f"{p} is neither a model folder nor a .gguf file")
    return None


def _from_pretrained(auto_class: str, src: Checkpoint, what: str):
    """transformers' Auto* loading of a folder or a GGUF, with any failure as one line."""
    import transformers

    cls = getattr(transformers, auto_class)
    try:
        if src.kind == "gguf":
            return cls.from_pretrained(str(src.folder), gguf_file=src.path.name)
        return cls.from_pretrained(str(src.path))
    except Exception as e:  # transformers raises many kinds; the user needs one line
        why = " ".join(str(e).split())  # its validation errors span lines
        raise MtadError(f"cannot {what} from {src.path}: {type(e).__name__}: {why}") from None


def load_hf_tokenizer(src: Checkpoint):
    """The source checkpoint's transformers tokenizer (export; the runtime reads `folder.tokenizer`)."""
    return _from_pretrained("AutoTokenizer", src, "load a tokenizer")


def load_config(src: Checkpoint):
    """The model's config alone (no weights): what the streaming export builds its meta model from."""
    return _from_pretrained("AutoConfig", src, "read a model config")


def load_model(src: Checkpoint, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    from mtad_trt.backends.device import TORCH_DTYPES

    torch_dtype = TORCH_DTYPES[dtype]
    kwargs = {"dtype": torch_dtype, "attn_implementation": "eager"}
    try:
        if src.kind == "gguf":
            model = AutoModelForCausalLM.from_pretrained(str(src.folder), gguf_file=src.path.name, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(src.path), **kwargs)
    except Exception as e:
        raise MtadError(f"cannot load a causal LM from {src.path}: {type(e).__name__}: {e}") from None
    return model.eval()
