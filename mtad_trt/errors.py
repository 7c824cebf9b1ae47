"""User-facing errors.

Everything the CLI, the server and the Python API refuse on purpose raises `MtadError` (or a
subclass) with a one-line message that says what is wrong and what to do. The CLI prints the
message and exits non-zero; the server maps it to an OpenAI-style error body. A traceback means a
bug, never bad input.
"""

from __future__ import annotations


class MtadError(Exception):
    """A refusal with a message meant for the user; `param` names the request field at fault
    (front ends report it, e.g. in OpenAI's error body)."""

    param: str | None = None

    def __init__(self, message: str = "", param: str | None = None) -> None:
        super().__init__(message)
        if param is not None:
            self.param = param


class CapacityError(MtadError):
    """The request does not fit the engine's KV-cache capacity."""

    param = "max_tokens"


class BackendUnavailable(MtadError):
    """The requested backend (TensorRT, CUDA, ...) is not installed or has no device."""


class EngineFolderError(MtadError):
    """The engine folder is missing, incomplete, or was built for another version/GPU."""


class Busy(MtadError):
    """The runtime's queue is full: retry later."""


class ShuttingDown(MtadError):
    """The runtime is draining or stopped and takes no new requests."""


class StepFailed(MtadError):
    """A model call failed at run time (an ONNX Runtime / TensorRT error): the requests in that call
    end with this error; the runtime itself goes on."""
