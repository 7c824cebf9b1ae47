"""Errors in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`, and the one mapping
from whatever a handler or the runtime raised to the status and body a client should see."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtad_trt.errors import Busy, CapacityError, MtadError, ShuttingDown, StepFailed
from mtad_trt.serve.protocol import EXTRA_FIELDS

log = logging.getLogger("mtad_trt.serve")


class ApiError(Exception):
    """An HTTP refusal in OpenAI's error shape; raised anywhere in a handler."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", "service_unavailable", code="shutting_down")


def as_api_error(exc: BaseException, retry_after_s: int = 1) -> ApiError:
    """Map anything a handler or the runtime raised onto the error a client should see."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Busy):
        return ApiError(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, ShuttingDown):
        return shutting_down()
    if isinstance(exc, StepFailed):  # the runtime's fault, not the request's: 500, and the server goes on
        return ApiError(500, str(exc), "server_error", code="step_failed")
    if isinstance(exc, CapacityError):
        return ApiError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, MtadError):
        return ApiError(400, str(exc), param=exc.param)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", code="internal_error")


def validation_error(e: ValidationError, model_cls: type[BaseModel] | None = None) -> ApiError:
    errors = e.errors(include_url=False)
    if any(err["type"] == "json_invalid" for err in errors):
        return ApiError(400, f"the request body is not valid JSON: {errors[0]['msg']}", code="invalid_json")
    # a field of the other endpoint (`echo` on chat, `messages` on completions): say where it belongs
    other = getattr(model_cls, "OTHER_ENDPOINT", {})
    for err in errors:
        if err["type"] == "extra_forbidden" and len(err["loc"]) == 1 and err["loc"][0] in other:
            return ApiError(400, other[err["loc"][0]], param=str(err["loc"][0]), code="invalid_value")
    msgs, param = [], None
    for err in errors[:3]:
        loc = ".".join(str(x) for x in err["loc"])
        param = param or (str(err["loc"][0]) if err["loc"] else None)
        if err["type"] == "extra_forbidden":
            msgs.append(f"unknown field '{loc}' (mtad-trt's extra fields: {', '.join(EXTRA_FIELDS)})")
        else:
            msgs.append(f"{loc or 'body'}: {err['msg']}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return ApiError(422, "; ".join(msgs) + more, param=param, code="invalid_value")


def parse(model_cls: type[BaseModel], raw: bytes):
    """A validated request of `model_cls`, or the ApiError its body deserves."""
    try:
        req = model_cls.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e, model_cls) from e
    unsupported = req.unsupported()
    if unsupported:
        raise ApiError(400, f"not supported by mtad-trt: {', '.join(w for _, w in unsupported)}",
                       param=unsupported[0][0], code="unsupported")
    invalid = req.invalid()
    if invalid:
        raise ApiError(400, "; ".join(m for _, m in invalid), param=invalid[0][0], code="invalid_value")
    return req


def install_handlers(app: FastAPI, retry_after_s: int = 1) -> None:
    """Every exception a route can raise becomes an OpenAI-shaped response."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(MtadError)
    async def _mtad_error(request: Request, exc: MtadError) -> JSONResponse:
        return as_api_error(exc, retry_after_s).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            msg, code = f"no such route: {request.method} {request.url.path}", "not_found"
        elif exc.status_code == 405:
            msg, code = f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            msg, code = str(exc.detail), None
        return ApiError(exc.status_code, msg, code=code, headers=dict(exc.headers or {})).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        loc = ".".join(str(x) for x in errs[0]["loc"]) if errs else None
        return ApiError(422, f"{loc}: {errs[0]['msg']}" if errs else "invalid request", param=loc).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return as_api_error(exc).response()
