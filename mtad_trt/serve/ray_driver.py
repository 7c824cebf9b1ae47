"""`mtad-trt serve --replicas N`: the driver that connects to (or starts) a Ray cluster, deploys
the replicas (`ray_replica`) with a bounded wait, serves until SIGTERM/SIGINT, then deletes the
application (Ray drains each replica) and stops a cluster it started.

A cluster it starts is a `ray start --head --block` child in a session of its own (`LocalHead`):
a terminal's Ctrl-C (SIGINT to the foreground process group), `kill -TERM -PGID` or a service
manager that signals the main process reach only the driver, which drains and then stops the
head itself. (An in-process `ray.init()` would start Ray's processes in the driver's group: the
same signal kills them first, and the driver then waits ~60 s for a GCS that is gone.)"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from mtad_trt.errors import MtadError
from mtad_trt.serve.ray_replica import (
    DEPLOYMENT_NAME,
    RayOptions,
    check_engine_folder,
    deployment,
    import_ray,
)
from mtad_trt.serve.settings import ServerSettings

APP_NAME = "mtad-trt"
RAY_LOGS = "/tmp/ray/session_latest/logs"  # on the head node of a cluster started by `ray start`


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


def connect(address: str | None, timeout_s: float = 3.0, *, num_cpus: int | None = None,
            stop: threading.Event | None = None) -> LocalHead | None:
    """Join the cluster at `address`, or (no address) start a local one (`LocalHead`) and join it.
    Returns the head it started (the caller stops it: `LocalHead.stop`), else None."""
    ray, _ = import_ray()
    if ray.is_initialized():
        return None
    if not address:
        head = LocalHead(num_cpus=num_cpus)
        try:
            gcs = head.start(stop)
            if gcs is not None:
                try:
                    ray.init(address=gcs, logging_level=logging.WARNING, log_to_driver=False)
                except ConnectionError as e:
                    head.keep_temp_dir = True
                    raise MtadError(f"cannot connect to the local Ray cluster at {gcs}: {e} "
                                    f"(its logs: {head.temp_dir})") from None
        except BaseException:
            head.stop(grace_s=5.0)
            raise
        return head
    if address != "auto":
        _probe(address, timeout_s)
    try:
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
        return None
    except ConnectionError as e:
        hint = ""
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            hint = (" (a cluster with token authentication, Ray's default for `ray start --head`, needs "
                    "RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN or ~/.ray/auth_token)")
        raise MtadError(f"cannot connect to the Ray cluster at {address}: {e}{hint}") from None


# The head's command: on Linux it first asks the kernel to SIGTERM it when the driver dies
# (PR_SET_PDEATHSIG survives exec), so even a SIGKILLed driver leaves no cluster behind: the
# head's SIGTERM handler stops every Ray process it started.
_HEAD_LAUNCHER = """import ctypes, os, signal, sys
parent, argv = int(sys.argv[1]), sys.argv[2:]
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the driver is already gone
        sys.exit(0)
os.execv(sys.executable, [sys.executable, "-m", "ray.scripts.scripts", *argv])
"""


class LocalHead:
    """A one-node Ray cluster for this driver alone: `ray start --head --block` as a child in a
    session (and process group) of its own, so terminal and process-group signals do not reach
    Ray's processes, with a temp dir of its own (`ray start` writes its address there, not to
    /tmp/ray/ray_current_cluster where every later `ray.init()` on the machine would find it),
    free ports, no dashboard. `stop()` ends it (SIGTERM to the head, which stops the Ray processes
    it started; any left in its session get SIGKILL) — never `ray stop`, which would stop every
    Ray cluster of the machine."""

    def __init__(self, num_cpus: int | None = None) -> None:
        self.num_cpus = num_cpus
        self.proc: subprocess.Popen | None = None
        self.temp_dir: str | None = None
        self.keep_temp_dir = False  # kept (with the logs) when the deploy failed

    @property
    def logs_dir(self) -> str:
        return os.path.join(self.temp_dir or "", "session_latest", "logs")

    def start(self, stop: threading.Event | None = None, timeout_s: float = 180.0) -> str | None:
        """Start the head; return its GCS address once it runs (None: `stop` was set first)."""
        _token_auth_like_ray_init()
        parent = os.environ.get("RAY_TMPDIR") or (sys.platform.startswith("linux") and os.environ.get("TMPDIR")) or "/tmp"
        if len(parent) > 40:  # Ray's Unix sockets live under it: keep their paths short
            parent = "/tmp"
        self.temp_dir = tempfile.mkdtemp(prefix="mtad-trt-ray-", dir=parent)
        args = ["start", "--head", "--block", "--port", str(_free_port()), "--temp-dir", self.temp_dir,
                "--include-dashboard=false", "--dashboard-port", str(_free_port()),
                "--dashboard-agent-listen-port", str(_free_port()),
                "--ray-client-server-port", str(_free_port()), "--disable-usage-stats"]
        if self.num_cpus is not None:
            args += ["--num-cpus", str(self.num_cpus)]
        log_path = os.path.join(self.temp_dir, "ray-start.log")
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", _HEAD_LAUNCHER, str(os.getpid()), *args],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=dict(os.environ))
        address_file = Path(self.temp_dir, "ray_current_cluster")  # written once the head runs
        deadline = time.monotonic() + timeout_s
        while not (address_file.exists() and address_file.read_text().strip()):
            if stop is not None and stop.is_set():
                return None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.keep_temp_dir = True
                tail = Path(log_path).read_text(errors="replace").strip().splitlines()[-5:]
                why = (f"exited with {self.proc.returncode}" if self.proc.poll() is not None
                       else f"did not start within {timeout_s:.0f} s")
                raise MtadError(f"the local Ray cluster (`ray start --head`) {why}: " + " | ".join(tail)
                                + f" (its logs: {self.temp_dir})")
            time.sleep(0.1)
        return address_file.read_text().strip()

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop the head and every process of its session; remove its temp dir (unless kept)."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    pass
            deadline = time.monotonic() + min(grace_s, 5.0)
            while _session_members(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)  # Ray's workers exit on their own once their raylet is gone
            for pid in _session_members(proc.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)
        if self.temp_dir and not self.keep_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _token_auth_like_ray_init() -> None:
    """What `ray.init()` does for a new local cluster: token authentication unless RAY_AUTH_MODE
    says otherwise, with a token generated in ~/.ray/auth_token if there is none. `ray start
    --head` alone turns it on only where a token already exists, and a driver that joins by
    address never turns it on: setting RAY_AUTH_MODE here, before either, makes them agree."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            enable_token_auth_by_default,
            ensure_token_if_auth_enabled,
        )
    except ImportError:  # a Ray without token authentication
        return
    enable_token_auth_by_default()
    ensure_token_if_auth_enabled(None, create_token_if_missing=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid` (Linux /proc; elsewhere none are found)."""
    members = []
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(entry.name))
    return members


def deploy(app, name: str = APP_NAME, timeout_s: float = 300.0, route_prefix: str = "/",
           stop: threading.Event | None = None, logs_dir: str = RAY_LOGS) -> None:
    """Deploy `app` and wait (at most timeout_s, or until `stop` is set) until it runs; a deploy
    that failed or did not become healthy in time is deleted and raised as one MtadError with
    Ray's message."""
    _, serve = import_ray()
    serve.run_many([serve.RunTarget(target=app, name=name, route_prefix=route_prefix)],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(name)
        state = str(getattr(status, "status", "NOT_STARTED"))
        if state.endswith("RUNNING") or (stop is not None and stop.is_set()):
            return
        failed = state.endswith("DEPLOY_FAILED") or state.endswith("UNHEALTHY")
        if failed or time.monotonic() > deadline:
            message = _status_message(status, logs_dir)
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


def _status_message(status, logs_dir: str = RAY_LOGS) -> str:
    if status is None:
        return "no status"
    parts = [status.message] if status.message else []
    for dep in status.deployments.values():
        if dep.message:
            parts.append(dep.message)
    text = "\n".join(parts).strip() or str(status.status)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > 2:  # a replica's traceback: Ray's summary line and the error itself
        return f"{lines[0]} ... {lines[-1]} (the replica logs under {logs_dir}/serve have the rest)"
    return " ".join(lines)


def serve_replicas(settings: ServerSettings, options: RayOptions, host: str = "127.0.0.1", port: int = 8000,
                   ray_address: str | None = None, app_name: str = APP_NAME, deploy_timeout_s: float = 300.0,
                   ready=None) -> None:
    """`mtad-trt serve --replicas N`: validate, connect (or start a local cluster), deploy, serve
    until SIGTERM/SIGINT, then delete the application (Ray drains each replica for up to the drain
    timeout) and stop the local cluster if this started one. A second signal while draining stops
    at once (KeyboardInterrupt: the CLI says "interrupted")."""
    settings.validate()
    settings.engines = str(check_engine_folder(settings.engines))
    _, serve = import_ray()
    settings.with_environment().warn_if_exposed(host)
    if options.runtime_env is None:
        options.runtime_env = _same_package_env()
    stop = _StopSignals()
    head: LocalHead | None = None
    deploying = False
    try:
        stop.install()  # from the start: a signal while the local cluster starts ends it cleanly
        head = connect(ray_address, stop=stop)
        stop.install()  # ray.init replaced the SIGTERM handler with its own (sys.exit)
        if stop.is_set():
            return
        serve.start(http_options={"host": host, "port": port})
        deploying = True
        try:
            deploy(deployment(settings, options), app_name, deploy_timeout_s, stop=stop,
                   logs_dir=head.logs_dir if head else RAY_LOGS)
        except MtadError:
            if head:
                head.keep_temp_dir = True  # the replica logs the message points to
            raise
        if stop.is_set():
            return
        url = f"http://{host}:{port}"
        print(f"serving {settings.served_name(APP_NAME)} at {url}/v1 on {options.num_replicas if not options.autoscaling_config else 'autoscaled'} "
              f"replica(s) (Ray Serve); Ctrl-C or SIGTERM stops", flush=True)
        if ready is not None:
            ready(url)
        while not stop.wait(0.5):
            pass
        print(f"draining: deleting the application (in-flight requests finish first, for up to "
              f"{settings.drain_timeout_s:g} s; a second Ctrl-C or SIGTERM stops at once)", flush=True)
    finally:
        import ray

        forced = False
        try:
            stop.second_raises = True
            if deploying:
                serve.delete(app_name)
            if head and ray.is_initialized():
                serve.shutdown()
        except KeyboardInterrupt:
            forced = True
            raise
        finally:
            stop.second_raises = False  # stopping the cluster is bounded: further signals wait for it
            try:
                if head:
                    try:
                        ray.shutdown()
                    finally:
                        head.stop(grace_s=2.0 if forced else 30.0)
            finally:
                stop.restore()


class _StopSignals(threading.Event):
    """Set by SIGTERM, SIGINT or SIGHUP (the last unless ignored, as under nohup); once
    `second_raises`, another one raises KeyboardInterrupt (stop draining, stop now)."""

    def __init__(self) -> None:
        super().__init__()
        self.second_raises = False
        self.previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.is_set() and self.second_raises:
            self.second_raises = False
            raise KeyboardInterrupt
        self.set()

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)):
            if s is None:
                continue
            current = signal.getsignal(s)
            if s == getattr(signal, "SIGHUP", None) and current == signal.SIG_IGN:
                continue
            self.previous.setdefault(s, current)
            signal.signal(s, self._handler)

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous.clear()


def _same_package_env() -> dict[str, Any]:
    """Replicas import the mtad-trt the driver imported (a source checkout, a worktree) first."""
    import mtad_trt

    root = str(Path(mtad_trt.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}
