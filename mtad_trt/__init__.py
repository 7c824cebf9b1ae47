"""mtad-trt: multi-token assisted decoding (MTAD / MMTAD) on exported engines.

The public API is `Pipeline` (load an engine folder, generate or stream text) and
`SamplingParams` / `DecodeParams` for per-request settings. Heavy modules load lazily so that
`import mtad_trt` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

from mtad_trt.engine.params import DecodeParams, SamplingParams
from mtad_trt.errors import MtadError

__all__ = ["DecodeParams", "MtadError", "Pipeline", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "Pipeline":
        from mtad_trt.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
