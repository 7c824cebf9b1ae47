"""A Ray Serve replica of `mtad-trt serve`: one runtime (draft + target engines) per replica,
the same FastAPI app as the single-process server behind Ray's HTTP proxy.

Each replica is an `MtadTrtServer`: it loads a `Pipeline`, runs it on a `RuntimeClient` thread
(continuous batching up to `max_batch`), and hands Ray the app `create_app` builds, through Ray
Serve's late-bound FastAPI ingress (`serve.ingress()` + `__serve_build_asgi_app__`), so routes,
errors, the API key, streaming and metrics are the single-process server's. Ray adds routing,
replica restarts (`check_health` fails when the runtime thread died or stopped making progress)
and draining (`graceful_shutdown_timeout_s` = the server's drain timeout).

Two ways in: `ray_driver.serve_replicas` (the CLI's `mtad-trt serve --replicas N [--ray-address
ADDR]`) and `build_app` here (an application builder for `serve run` / `serve deploy`;
examples/serve_config.yaml). `ray` is imported lazily: the rest of mtad-trt imports without it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtad_trt.backends import MAX_BATCH_CEILING
from mtad_trt.errors import EngineFolderError, MtadError
from mtad_trt.serve.settings import ServerSettings

log = logging.getLogger("mtad_trt.serve.ray")

DEPLOYMENT_NAME = "MtadTrtServer"
REPLICA_HEADER = "x-mtad-replica"  # every response names the replica that served it
PID_HEADER = "x-mtad-pid"
RAY_EXTRA = "ray serving needs the 'ray' extra: pip install 'mtad-trt[ray]'"


def import_ray():
    """(ray, ray.serve), or one MtadError naming the extra to install."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise MtadError(f"{RAY_EXTRA} ({e})") from None
    return ray, serve


# -- how Ray runs the replicas ---------------------------------------------------------------------
@dataclass
class RayOptions:
    """How Ray Serve runs the replicas (the deployment's options)."""

    num_replicas: int | None = None  # None: Ray's default (1), or what a serve config says
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica; give it explicitly on Jetson (docs/scale-out.md)
    max_ongoing_requests: int | None = None  # None: the replica's max batch (its real capacity)
    max_queued_requests: int = 64  # per proxy/handle; more get 429 with Retry-After
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float | None = None  # None: the replica's drain timeout
    max_constructor_retry_count: int = 2  # a replica that cannot load fails the deploy, no endless loop
    autoscaling_config: dict[str, Any] | None = None  # replaces num_replicas when set
    runtime_env: dict[str, Any] | None = None

    def deployment_options(self, replica: ServerSettings) -> dict[str, Any]:
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.runtime_env:
            actor["runtime_env"] = self.runtime_env
        opts: dict[str, Any] = dict(
            name=DEPLOYMENT_NAME,
            ray_actor_options=actor,
            # the replica's batch when set; else the default's ceiling (a replica that picks fewer rows
            # for its memory queues the rest in its own FIFO)
            max_ongoing_requests=self.max_ongoing_requests or replica.max_batch or MAX_BATCH_CEILING,
            max_queued_requests=self.max_queued_requests,
            backpressure_config={"status_code": 429, "retry_after_s": 1},
            health_check_period_s=self.health_check_period_s,
            health_check_timeout_s=self.health_check_timeout_s,
            graceful_shutdown_timeout_s=(self.graceful_shutdown_timeout_s
                                         if self.graceful_shutdown_timeout_s is not None
                                         else replica.drain_timeout_s),
            graceful_shutdown_wait_loop_s=0.5,
            max_constructor_retry_count=self.max_constructor_retry_count,
        )
        if self.autoscaling_config:
            opts["autoscaling_config"] = self.autoscaling_config
            opts["num_replicas"] = "auto"
        elif self.num_replicas is not None:
            opts["num_replicas"] = self.num_replicas
        return opts


def check_engine_folder(engines: str | Path) -> Path:
    """Refuse, in the driver and before anything is deployed, a folder no replica could load."""
    from mtad_trt.folder.manifest import Manifest

    folder = Path(engines).expanduser().resolve()
    manifest = Manifest.load(folder)
    for role, entry in manifest.roles.items():
        if not (folder / entry.onnx).is_file():
            raise EngineFolderError(f"engine folder {folder} has no {role} graph at {entry.onnx}: re-export the engine")
    if not (folder / manifest.tokenizer).is_dir():
        raise EngineFolderError(f"engine folder {folder} has no tokenizer: re-export the engine")
    return folder


# -- the replica ------------------------------------------------------------------------------------
class RuntimeWatchdog:
    """Sits between the runtime and the server's metrics (an `Observer` that forwards everything)
    and remembers when the scheduler last made progress; `check` raises when the runtime thread
    died, or has had work for `timeout_s` without finishing an iteration (a wedged step)."""

    def __init__(self, inner, client, timeout_s: float, clock=time.monotonic) -> None:
        self._inner, self._client, self.timeout_s, self._clock = inner, client, timeout_s, clock
        self._waiting = 0
        self._progress = clock()

    def __getattr__(self, name: str):  # started, tokens, finished, dropped: the metrics' own
        return getattr(self._inner, name)

    def waiting(self, n: int) -> None:
        if n and not self._waiting and not self._client.running:
            self._progress = self._clock()  # idle -> busy: the clock starts now
        self._waiting = n
        if self._inner is not None:
            self._inner.waiting(n)

    def started(self, handle) -> None:
        self._progress = self._clock()
        if self._inner is not None:
            self._inner.started(handle)

    def iteration(self, rows: int, seconds: float) -> None:
        self._progress = self._clock()
        if self._inner is not None:
            self._inner.iteration(rows, seconds)

    def check(self) -> None:
        if self._client.died:
            raise RuntimeError("the runtime thread has stopped")
        running, waiting = self._client.running, self._waiting
        stalled = self._clock() - self._progress
        if (running or waiting) and stalled > self.timeout_s:
            raise RuntimeError(f"the runtime is wedged: no scheduler iteration for {stalled:.0f} s "
                               f"with {running} running and {waiting} waiting")


class _ReplicaHeaders:
    """Pure ASGI middleware: every HTTP response says which replica (and process) served it."""

    def __init__(self, app, replica: str) -> None:
        self.app = app
        self.extra = [(REPLICA_HEADER.encode(), replica.encode()), (PID_HEADER.encode(), str(os.getpid()).encode())]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.extra]}
            await send(message)

        await self.app(scope, receive, tagged)


class MtadTrtServer:
    """One replica: loads the engines, builds the single-process server's app around them.

    Wrapped by `serve.ingress()` and `serve.deployment` in `deployment()`; importable (and
    constructible) without Ray, which is how the tests check it in-process too.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        from mtad_trt.client import RuntimeClient
        from mtad_trt.serve.app import create_app

        settings = ServerSettings.from_dict(config).with_environment()
        settings.validate()
        self.replica_id = _replica_id()
        self.pipeline = settings.load()
        self.client = RuntimeClient(self.pipeline, settings.max_queue)
        self.mtad_app = create_app(self.client, settings)  # sets client.observer to the app's metrics
        self.watchdog = RuntimeWatchdog(self.client.observer, self.client, settings.wedge_timeout_s)
        self.client.observer = self.watchdog
        self.mtad_app.add_middleware(_ReplicaHeaders, replica=self.replica_id)
        log.info("replica %s (pid %d) serves %s on %s, max batch %d", self.replica_id, os.getpid(),
                 settings.served_name(self.pipeline.info().name), self.pipeline.backend, self.pipeline.max_batch)

    def __serve_build_asgi_app__(self):
        return self.mtad_app

    def check_health(self) -> None:
        """Ray calls this every health_check_period_s; raising makes Ray replace the replica."""
        self.watchdog.check()

    def __del__(self) -> None:
        # Ray runs the app's lifespan shutdown (drain, stop the runtime thread) before this.
        pipeline = self.__dict__.pop("pipeline", None)
        if pipeline is not None:
            pipeline.close()


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a Ray replica (tests, embedding)
        return f"local-{os.getpid()}"


def deployment(settings: ServerSettings, options: RayOptions | None = None):
    """The bound Ray Serve application: `options.num_replicas` replicas serving `settings`."""
    _, serve = import_ray()
    options = options or RayOptions()
    cls = serve.ingress()(MtadTrtServer)
    return serve.deployment(cls, **options.deployment_options(settings)).bind(settings.to_dict())


def build_app(args: dict[str, Any]):
    """Application builder for `serve run` / `serve deploy` (import path
    `mtad_trt.serve.ray_replica:build_app`): `args` are `ServerSettings` fields, plus an optional
    `ray` dict of `RayOptions` fields; a config file's `deployments:` entry for `MtadTrtServer`
    overrides the options (GPUs per replica, autoscaling bounds, queue limit)."""
    args = dict(args)
    ray_opts = RayOptions(**(args.pop("ray", None) or {}))
    settings = ServerSettings.from_dict(args)
    settings.engines = str(check_engine_folder(settings.engines))
    return deployment(settings, ray_opts)
