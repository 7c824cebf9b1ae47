"""Running the app: `serve` (uvicorn, draining on SIGTERM) and `ServerThread` (a background
server on a loopback port, for tests, notebooks and benchmarks)."""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from mtad_trt.serve.app import ServerState, create_app
from mtad_trt.serve.settings import ServerSettings

log = logging.getLogger("mtad_trt.serve")


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, plus: on SIGTERM/SIGINT the app starts refusing new requests (503)
    before uvicorn closes the listener and waits (timeout_graceful_shutdown) for in-flight ones."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig, frame) -> None:
        self._state.begin_drain()
        super().handle_exit(sig, frame)


def serve(settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Load `settings.engines` and serve it until SIGTERM/SIGINT (then drain for up to
    settings.drain_timeout_s).

    `settings.max_batch` requests run at once (continuous batching); `spec_policy` "auto" lets the
    runtime pick γ (and B) per iteration for the requests that did not fix them, "fixed" never does.
    Binds loopback unless `host` says otherwise. Like uvicorn, re-raises the signal that stopped
    it once the drain is done, so a supervisor sees "terminated by SIGTERM".
    """
    settings.validate()  # before the (slow) engine load
    settings.warn_if_exposed(host)
    pipeline = settings.load()
    for name, why in pipeline.choices.items():  # what was picked by rule, so the operator sees it
        print(f"mtad-trt serve: --{name.replace('_', '-')} {why}", file=sys.stderr, flush=True)
    try:
        app = create_app(pipeline, settings)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                timeout_graceful_shutdown=settings.drain_timeout_s)
        _DrainingServer(config, app.state.mtad).run()
    finally:
        pipeline.close()


class ServerThread:
    """Run an app on a loopback port in a background thread: `with ServerThread(app) as url: ...`.

    The socket is bound before the thread starts (port 0 = a free port), so `url` is usable at
    once and no two servers race for a port.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        bound = self.sock.getsockname()[1]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{bound}"
        config.setdefault("log_level", "warning")
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="on", **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
