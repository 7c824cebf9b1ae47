"""`mtad-trt serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the runtime.

One job a module, as vLLM's `entrypoints/openai/` splits it: `protocol` (request schemas),
`errors` (OpenAI-shaped errors and the one mapping onto them), `serving` (the logic both
generation endpoints share), `routes` (thin handlers), `job` (the channel from the runtime
thread to the event loop), `metrics` (Prometheus, fed by the runtime's events), `app` (state,
gate, lifespan), `server` (uvicorn with drain; a background server for tests).
"""

from mtad_trt.serve.app import create_app
from mtad_trt.serve.server import ServerThread, serve
from mtad_trt.serve.settings import ServerSettings

__all__ = ["ServerSettings", "ServerThread", "create_app", "serve"]
