"""The FastAPI app: state shared by the routes, the gate (drain, API key), lifespan, handlers.

`create_app(pipeline | client, settings)` builds the app without sockets (tests, embedding, a Ray
Serve replica); the runtime thread starts with the app's lifespan (or at the first request) and
stops, after draining, when the lifespan ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time

from fastapi import FastAPI

from mtad_trt import __version__
from mtad_trt.client import RuntimeClient
from mtad_trt.pipeline import Pipeline
from mtad_trt.serve.errors import ApiError, install_handlers, shutting_down
from mtad_trt.serve.metrics import ServerMetrics
from mtad_trt.serve.routes import router
from mtad_trt.serve.serving import ChatServing, CompletionServing
from mtad_trt.serve.settings import ServerSettings

log = logging.getLogger("mtad_trt.serve")


class ServerState:
    """Everything the routes share: the runtime client, the two endpoints' serving, metrics."""

    def __init__(self, client: RuntimeClient, settings: ServerSettings, metrics: ServerMetrics, model_name: str) -> None:
        self.client, self.settings, self.metrics, self.model_name = client, settings, metrics, model_name
        self.info = client.info()
        self.completions = CompletionServing(client, settings, model_name)
        self.chat = ChatServing(client, settings, model_name)
        self.created = int(time.time())
        self.draining = False

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "mtad-trt",
                "max_model_len": self.info.max_model_len}

    def begin_drain(self) -> None:
        """Stop taking requests (503) while those already accepted finish; called on SIGTERM."""
        if not self.draining:
            log.info("draining: refusing new requests, finishing accepted ones")
        self.draining = True

    def close(self) -> None:
        self.completions.close()
        self.chat.close()


class _Gate:
    """Pure ASGI middleware (streaming- and cancellation-safe, unlike BaseHTTPMiddleware): 503
    while draining, 401 on /v1/* without the API key."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            err = None
            if self.state.draining and path != "/metrics":
                err = shutting_down()
                err.headers["Connection"] = "close"
            elif self.state.settings.api_key and path.startswith("/v1"):
                headers = dict(scope["headers"])
                auth = headers.get(b"authorization", b"").decode("latin-1")
                given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
                if not hmac.compare_digest(given.encode(), self.state.settings.api_key.encode()):
                    err = ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                   code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            if err is not None:
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(runtime: Pipeline | RuntimeClient, settings: ServerSettings | None = None) -> FastAPI:
    """An OpenAI-compatible app over a loaded Pipeline (wrapped in a RuntimeClient here) or a client."""
    settings = settings or ServerSettings()
    settings.validate()
    info = runtime.info()
    metrics = ServerMetrics(settings.model_name or info.name, prefix_cache=info.prefix_cache_bytes > 0)
    if isinstance(runtime, RuntimeClient):
        client = runtime
        client.observer = metrics
    else:
        client = RuntimeClient(runtime, settings.max_queue, observer=metrics)
    state = ServerState(client, settings, metrics, settings.model_name or client.info().name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        client.start()
        yield
        state.begin_drain()
        await asyncio.get_running_loop().run_in_executor(None, client.stop, 5.0)
        state.close()

    app = FastAPI(title="mtad-trt", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.mtad = state
    app.add_middleware(_Gate, state=state)
    install_handlers(app, settings.retry_after_s)
    app.include_router(router)
    return app
