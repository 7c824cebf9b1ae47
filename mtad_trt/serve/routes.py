"""The HTTP routes: thin handlers over the app's `ServerState` (see `app.py`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mtad_trt import __version__
from mtad_trt.serve.errors import ApiError

router = APIRouter()


def _state(request: Request):
    return request.app.state.mtad


@router.get("/health")
async def health(request: Request) -> Response:
    if _state(request).client.died:
        raise ApiError(503, "the runtime thread has stopped", "service_unavailable", code="worker_dead")
    return JSONResponse({"status": "ok"})


@router.get("/version")
async def version(request: Request) -> dict:
    state = _state(request)
    return {"version": __version__, "model": state.model_name, "backend": state.info.backend}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_state(request).model_card()]}


@router.get("/v1/models/{model:path}")
async def get_model(request: Request, model: str) -> dict:
    state = _state(request)
    state.completions.check_model(model)
    return state.model_card()


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _state(request).completions.create(request)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _state(request).chat.create(request)
