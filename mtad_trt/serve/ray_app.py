"""`mtad-trt serve` as replicas on Ray Serve: one runtime (draft + target engines) per replica,
the same FastAPI app as the single-process server behind Ray's HTTP proxy.

Each replica is an `MtadTrtServer`: it loads a `Pipeline`, runs it on a `RuntimeClient` thread
(continuous batching up to `max_batch`), and hands Ray the app `create_app` builds, through Ray
Serve's late-bound FastAPI ingress (`serve.ingress()` + `__serve_build_asgi_app__`), so routes,
errors, the API key, streaming and metrics are the single-process server's. Ray adds routing,
replica restarts (`check_health` fails when the runtime thread died or stopped making progress)
and draining (`graceful_shutdown_timeout_s` = the server's drain timeout).

Two ways in: `serve_replicas` (the CLI's `mtad-trt serve --replicas N [--ray-address ADDR]`) and
`build_app` (an application builder for `serve run` / `serve deploy`; examples/serve_config.yaml).
`ray` is imported lazily: the rest of mtad-trt imports without it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mtad_trt.errors import EngineFolderError, MtadError

log = logging.getLogger("mtad_trt.serve.ray")

APP_NAME = "mtad-trt"
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


# -- what a replica loads -------------------------------------------------------------------------
@dataclass
class ReplicaConfig:
    """What every replica loads and serves: the engine folder, runtime and server settings.

    Plain JSON-able values: Ray ships it to every replica, and a serve config's `args` are these
    fields. `engines` must be the same path on every node that runs a replica.
    """

    engines: str
    backend: str = "auto"
    device: str = "auto"
    threads: int = 1
    max_batch: int = 1
    prefill_chunk: int | None = None
    spec_policy: str = "auto"
    model_name: str | None = None
    api_key: str | None = None  # else MTAD_TRT_API_KEY in the replica's environment
    max_queue: int = 64  # the replica's own FIFO (Ray's proxy queues before it: max_queued_requests)
    max_body_bytes: int = 1 << 20
    drain_timeout_s: float = 30.0
    defaults: dict[str, Any] = field(default_factory=dict)  # decoder, gamma, beam_width, threshold
    wedge_timeout_s: float = 120.0  # check_health fails after this long with work and no iteration

    def settings(self):
        from mtad_trt.serve.serving import ServerSettings

        return ServerSettings(model_name=self.model_name or Path(self.engines).name,
                              api_key=self.api_key or os.environ.get("MTAD_TRT_API_KEY") or None,
                              max_queue=self.max_queue, max_body_bytes=self.max_body_bytes,
                              drain_timeout_s=self.drain_timeout_s, defaults=dict(self.defaults))

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> ReplicaConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise MtadError(f"unknown mtad-trt replica setting(s): {', '.join(unknown)} "
                            f"(known: {', '.join(sorted(known))})")
        if "engines" not in args:
            raise MtadError("the replica settings need 'engines' (the engine folder)")
        return cls(**args)


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

    def deployment_options(self, replica: ReplicaConfig) -> dict[str, Any]:
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.runtime_env:
            actor["runtime_env"] = self.runtime_env
        opts: dict[str, Any] = dict(
            name=DEPLOYMENT_NAME,
            ray_actor_options=actor,
            max_ongoing_requests=self.max_ongoing_requests or replica.max_batch,
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
    from mtad_trt.manifest import Manifest

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
        from mtad_trt.pipeline import DEFAULT_PREFILL_CHUNK, Pipeline
        from mtad_trt.serve.app import create_app

        cfg = ReplicaConfig.from_dict(config)
        settings = cfg.settings()
        settings.validate()
        self.replica_id = _replica_id()
        self.pipeline = Pipeline.load(cfg.engines, backend=cfg.backend, device=cfg.device, threads=cfg.threads,
                                      max_batch=cfg.max_batch, prefill_chunk=cfg.prefill_chunk or DEFAULT_PREFILL_CHUNK,
                                      spec_policy=cfg.spec_policy)
        self.client = RuntimeClient(self.pipeline, settings.max_queue)
        self.mtad_app = create_app(self.client, settings)  # sets client.observer to the app's metrics
        self.watchdog = RuntimeWatchdog(self.client.observer, self.client, cfg.wedge_timeout_s)
        self.client.observer = self.watchdog
        self.mtad_app.add_middleware(_ReplicaHeaders, replica=self.replica_id)
        log.info("replica %s (pid %d) serves %s on %s, max batch %d", self.replica_id, os.getpid(),
                 settings.model_name, self.pipeline.backend, cfg.max_batch)

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


def deployment(config: ReplicaConfig, options: RayOptions | None = None):
    """The bound Ray Serve application: `options.num_replicas` replicas of `config`."""
    _, serve = import_ray()
    options = options or RayOptions()
    cls = serve.ingress()(MtadTrtServer)
    return serve.deployment(cls, **options.deployment_options(config)).bind(asdict(config))


def build_app(args: dict[str, Any]):
    """Application builder for `serve run` / `serve deploy` (import path
    `mtad_trt.serve.ray_app:build_app`): `args` are `ReplicaConfig` fields, plus an optional
    `ray` dict of `RayOptions` fields; a config file's `deployments:` entry for `MtadTrtServer`
    overrides the options (GPUs per replica, autoscaling bounds, queue limit)."""
    args = dict(args)
    ray_opts = RayOptions(**(args.pop("ray", None) or {}))
    config = ReplicaConfig.from_dict(args)
    config.engines = str(check_engine_folder(config.engines))
    return deployment(config, ray_opts)


# -- the driver: connect, deploy with a bounded wait, serve until SIGTERM ----------------------------
def _probe(address: str, timeout_s: float) -> None:
    """Refuse an unreachable cluster address within timeout_s (ray.init may wait much longer)."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise MtadError(f"--ray-address must be HOST:PORT (the head node's GCS, e.g. 10.0.0.1:6379), "
                        f"ray://HOST:PORT or auto; got '{address}'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise MtadError(f"cannot reach the Ray cluster at {address}: {e} (is `ray start --head` running there?)") from None


def connect(address: str | None, timeout_s: float = 3.0, **local: Any) -> bool:
    """Join the cluster at `address` (or start a local one with `local` ray.init arguments).
    Returns whether a local cluster was started (the caller then shuts it down)."""
    ray, _ = import_ray()
    if ray.is_initialized():
        return False
    if address and address != "auto":
        _probe(address, timeout_s)
    try:
        if address:
            # Something that accepts TCP but is no GCS (another service, a proxy) would otherwise
            # keep ray.init retrying for ~20 s: Ray reads its connect budget from this variable.
            ours = "RAY_gcs_server_port_wait_time_s" not in os.environ
            if ours:
                os.environ["RAY_gcs_server_port_wait_time_s"] = str(max(1, round(timeout_s)))
            try:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            finally:
                if ours:
                    os.environ.pop("RAY_gcs_server_port_wait_time_s", None)
            return False
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False, **local)
        return True
    except ConnectionError as e:
        hint = ""
        if address and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            hint = (" (a cluster with token authentication, Ray's default for `ray start --head`, needs "
                    "RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN or ~/.ray/auth_token)")
        raise MtadError(f"cannot connect to the Ray cluster at {address}: {e}{hint}") from None


def deploy(app, name: str = APP_NAME, timeout_s: float = 300.0, route_prefix: str = "/") -> None:
    """Deploy `app` and wait (at most timeout_s) until it runs; a deploy that failed or did not
    become healthy in time is deleted and raised as one MtadError with Ray's message."""
    _, serve = import_ray()
    serve.run_many([serve.RunTarget(target=app, name=name, route_prefix=route_prefix)],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(name)
        state = str(getattr(status, "status", "NOT_STARTED"))
        if state.endswith("RUNNING"):
            return
        failed = state.endswith("DEPLOY_FAILED") or state.endswith("UNHEALTHY")
        if failed or time.monotonic() > deadline:
            message = _status_message(status)
            serve.delete(name, _blocking=False)
            why = "failed" if failed else f"did not become healthy within {timeout_s:.0f} s"
            raise MtadError(f"the Ray deployment {why}: {message}")
        time.sleep(0.5)


def running_replicas(name: str = APP_NAME) -> int:
    """Healthy, running replicas of the application `name` (0 while it deploys, fails or is gone)."""
    _, serve = import_ray()
    status = serve.status().applications.get(name)
    if status is None or not str(status.status).endswith("RUNNING"):
        return 0
    dep = status.deployments.get(DEPLOYMENT_NAME)
    if dep is None or not str(dep.status).endswith("HEALTHY"):
        return 0
    return int(dep.replica_states.get("RUNNING", 0))


def _status_message(status) -> str:
    if status is None:
        return "no status"
    parts = [status.message] if status.message else []
    for dep in status.deployments.values():
        if dep.message:
            parts.append(dep.message)
    text = "\n".join(parts).strip() or str(status.status)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > 2:  # a replica's traceback: Ray's summary line and the error itself
        return f"{lines[0]} ... {lines[-1]} (the replica logs under /tmp/ray/session_latest/logs/serve have the rest)"
    return " ".join(lines)


def serve_replicas(config: ReplicaConfig, options: RayOptions, host: str = "127.0.0.1", port: int = 8000,
                   ray_address: str | None = None, app_name: str = APP_NAME, deploy_timeout_s: float = 300.0,
                   ready=None) -> None:
    """`mtad-trt serve --replicas N`: validate, connect (or start a local cluster), deploy, serve
    until SIGTERM/SIGINT, then delete the application (Ray drains each replica for up to the drain
    timeout) and stop the local cluster if this started one."""
    from mtad_trt.serve.server import _is_loopback

    config.settings().validate()
    config.engines = str(check_engine_folder(config.engines))
    _, serve = import_ray()
    if not _is_loopback(host) and not config.settings().api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use it", host)
    if options.runtime_env is None:
        options.runtime_env = _same_package_env()
    local = connect(ray_address, num_cpus=None)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": host, "port": port})
        deploy(deployment(config, options), app_name, deploy_timeout_s)
        url = f"http://{host}:{port}"
        print(f"serving {config.settings().model_name} at {url}/v1 on {options.num_replicas if not options.autoscaling_config else 'autoscaled'} "
              f"replica(s) (Ray Serve); Ctrl-C or SIGTERM stops", flush=True)
        if ready is not None:
            ready(url)
        while not stop.wait(0.5):
            pass
        print("draining: deleting the application (in-flight requests finish first)", flush=True)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        try:
            serve.delete(app_name)
            if local:
                serve.shutdown()
        finally:
            if local:
                import ray

                ray.shutdown()


def _same_package_env() -> dict[str, Any]:
    """Replicas import the mtad-trt the driver imported (a source checkout, a worktree) first."""
    import mtad_trt

    root = str(Path(mtad_trt.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}
