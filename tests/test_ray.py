"""`mtad-trt serve` as replicas on Ray Serve, on a real local Ray cluster (loopback only, one
cluster for the module): the official `openai` client through Ray's proxy gets the Pipeline's
greedy output, requests spread over both replicas, a SIGKILLed replica's in-flight requests end
with an error while later ones succeed and the deployment heals, bad input fails fast, and the
one-command CLI joins an existing cluster and drains on SIGTERM. Before that cluster exists: the
CLI that starts its own cluster, and the single-process server, each in a session of its own,
drain an in-flight stream and exit in time on SIGTERM or SIGINT, to the main process or to its
process group (a terminal's Ctrl-C, `kill -TERM -PGID`), leaving no process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

import mtad_trt
from mtad_trt.errors import MtadError
from mtad_trt.folder.manifest import Manifest
from mtad_trt.serve import ray_driver, ray_replica
from mtad_trt.serve.settings import ServerSettings

try:
    import ray
    from ray import serve

    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False

needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed: pip install 'mtad-trt[ray]' "
                                                    "(scripts/test.sh installs it)")

MODEL = "tiny-pair"
KEY = "ray-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROOT = str(Path(mtad_trt.__file__).resolve().parent.parent)  # the package under test, for the replicas


def env() -> dict[str, str]:
    """For subprocesses, read at call time: after ray.init it carries Ray's token-auth mode."""
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


# A slow request on the tiny engine: wide MMTAD trees, ~1-2 s for 180 tokens on 2 cores.
SLOW = {"decoder": "mmtad", "gamma": 8, "beam_width": 8, "ignore_eos": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.25)


# -- stopping, whichever way the signal arrives ---------------------------------------------------
# These start servers of their own; they come before the module's cluster exists (tests run in file
# order), so two Ray clusters never share the two cores.
DRAIN_S = 20  # --drain-timeout
EXIT_MARGIN_S = 20  # after the drain: deleting the app, stopping Ray (~5 s here), a loaded machine
# how a signal arrives: at the main process alone (systemd's KillMode=mixed, `kill PID`), at the
# whole process group (`kill -TERM -PGID`), or at the group as SIGINT (a terminal's Ctrl-C)
SIGNAL_PATHS = {"sigterm-main": (signal.SIGTERM, False), "sigterm-group": (signal.SIGTERM, True),
                "sigint-group": (signal.SIGINT, True)}


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, session id, state) of every process, zombies excluded (from ps)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,sid=,stat="], capture_output=True, text=True, check=True).stdout
    rows = (line.split() for line in out.splitlines())
    return {int(pid): (int(ppid), int(sid), stat) for pid, ppid, sid, stat in rows if not stat.startswith("Z")}


def _in_sessions(sids: set[int]) -> set[int]:
    return {pid for pid, (_, sid, _) in _processes().items() if sid in sids}


def _start_in_own_session(args: list[str], log: Path) -> subprocess.Popen:
    """`mtad-trt serve ARGS` as a terminal or a service manager starts it: a session (and process
    group) of its own, SIGINT at its default (a background job's shell hands it ignored)."""
    with open(log, "wb") as out:  # a file, not a pipe: a chatty server never blocks on it
        return subprocess.Popen([sys.executable, "-m", "mtad_trt.cli", "serve", *args], env=env(), cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _stream_signal_and_finish(url: str, model: str, proc: subprocess.Popen, sig: int, group: bool) -> float:
    """Stream a slow 180-token request; after its first chunk send `sig` (to the process group or
    the main process); the stream must still run to its full length. Returns when the signal went."""
    body = {"model": model, "prompt": "hi", "max_tokens": 180, "stream": True, **SLOW}
    with httpx.Client(base_url=url, trust_env=False, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        sent = time.monotonic()
        rest = [first, *(line for line in lines if line.startswith("data:"))]
    assert rest[-1] == "data: [DONE]"
    final = json.loads(rest[-2].removeprefix("data: "))
    assert final["choices"][0]["finish_reason"] == "length"  # finished, not cut
    assert final["mtad"]["generated_tokens"] == 180
    return sent


def _exits_in_time(proc: subprocess.Popen, sig: int, sent: float, log: Path) -> None:
    try:
        rc = proc.wait(max(1.0, sent + DRAIN_S + EXIT_MARGIN_S - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {DRAIN_S + EXIT_MARGIN_S} s after the signal:\n{log.read_text()}")
    assert rc in (0, -sig, 128 + sig), f"exit status {rc}:\n{log.read_text()}"
    text = log.read_text()
    assert "Traceback" not in text and "Failed to connect to GCS" not in text, text


@needs_ray
@pytest.mark.slow
@pytest.mark.parametrize("path", list(SIGNAL_PATHS))
def test_local_cluster_drains_and_stops_whichever_way_the_signal_arrives(pair_engine, tmp_path, path):
    """`serve --replicas 1` starting its own cluster, in its own session: Ray's processes are not
    in the driver's session (so not in its process group), and on SIGTERM or SIGINT, to the driver
    or to its group, the in-flight stream finishes, the driver exits within the drain timeout +
    a margin and no process of the cluster it started is left, nor its temp dir."""
    sig, group = SIGNAL_PATHS[path]
    port, log = _free_port(), tmp_path / "cli.log"
    proc = _start_in_own_session(["--engines", str(pair_engine), "--replicas", "1", "--port", str(port),
                                  "--backend", "ort", "--cpus-per-replica", "0.5", "--model-name", MODEL,
                                  "--drain-timeout", str(DRAIN_S)], log)
    heads: set[int] = set()
    try:
        wait_for(lambda: proc.poll() is not None or "serving" in log.read_text(), 180, "the CLI to deploy")
        assert proc.poll() is None, log.read_text()
        procs = _processes()
        heads = {pid for pid, (ppid, sid, _) in procs.items() if ppid == proc.pid and sid != proc.pid}
        children = {pid: row for pid, row in procs.items() if row[0] == proc.pid}
        assert len(heads) == 1, f"the driver's children (pid: ppid, sid, state): {children}"  # `ray start --head`,
        # a child in a session of its own...
        head = next(iter(heads))
        assert procs[head][1] == head
        assert _in_sessions({proc.pid}) == {proc.pid}  # ...and no Ray process shares the driver's
        assert len(_in_sessions(heads)) >= 4  # GCS, raylet, the replica, ...: all in the head's session
        argv = Path(f"/proc/{head}/cmdline").read_text().split("\0")
        temp_dir = Path(argv[argv.index("--temp-dir") + 1])
        assert temp_dir.is_dir() and temp_dir != Path("/tmp/ray")  # not where ray.init() looks for clusters

        sent = _stream_signal_and_finish(f"http://127.0.0.1:{port}", MODEL, proc, sig, group)
        _exits_in_time(proc, sig, sent, log)
        assert "draining:" in log.read_text()
        wait_for(lambda: not _in_sessions(heads | {proc.pid}), 5, "the cluster's processes to be gone")
        assert not temp_dir.exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in _in_sessions(heads):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["sigterm-group", "sigint-group"])
def test_single_process_server_drains_on_a_signal_to_its_group(pair_engine, tmp_path, path):
    """The same for `serve` without --replicas, signalled through its process group (SIGTERM to
    the main process alone: tests/test_serve.py)."""
    sig, group = SIGNAL_PATHS[path]
    port, log = _free_port(), tmp_path / "server.log"
    proc = _start_in_own_session(["--engines", str(pair_engine), "--port", str(port), "--backend", "ort",
                                  "--model-name", MODEL, "--drain-timeout", str(DRAIN_S)], log)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(url + "/health", timeout=2, trust_env=False).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 120, "the server to load")
        sent = _stream_signal_and_finish(url, MODEL, proc, sig, group)
        _exits_in_time(proc, sig, sent, log)
        wait_for(lambda: not _in_sessions({proc.pid}), 5, "the server's processes to be gone")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- the cluster: one per module ---------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(pair_engine):
    if not HAVE_RAY:
        pytest.skip("ray is not installed")
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20, log_to_driver=False,
             logging_level="WARNING", runtime_env={"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServerSettings(engines=str(pair_engine), backend="ort", model_name=MODEL, api_key=KEY,
                                       max_batch=2, drain_timeout_s=10)
        options = ray_replica.RayOptions(num_replicas=2, num_cpus=0.5, health_check_period_s=1, health_check_timeout_s=10)
        ray_driver.deploy(ray_replica.deployment(config, options), timeout_s=120)
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, gcs=ray.get_runtime_context().gcs_address)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    with httpx.Client(trust_env=False, timeout=60) as hc:
        yield openai.OpenAI(base_url=cluster.url + "/v1", api_key=KEY, max_retries=0, http_client=hc)


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster.url, headers=AUTH, trust_env=False, timeout=60) as c:
        yield c


# -- through the proxy, with the official client -------------------------------------------------
@needs_ray
def test_completion_chat_and_stream_equal_the_pipeline(client, pair_pipeline):
    ref = pair_pipeline.generate("def fib(n):", temperature=0, max_new_tokens=20, ignore_eos=True)
    r = client.completions.create(model=MODEL, prompt="def fib(n):", max_tokens=20, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    assert r.choices[0].text == ref.text and r.choices[0].model_extra["token_ids"] == ref.token_ids
    assert r.usage.completion_tokens == 20

    msgs = [{"role": "user", "content": "Hello world!"}]
    ref = pair_pipeline.generate(pair_pipeline.encode_chat(msgs), temperature=0, max_new_tokens=16, ignore_eos=True)
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == ref.text

    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == 16
    assert len(chunks) > 3  # streamed in pieces through Ray's proxy, not one body


@needs_ray
def test_api_key_holds_through_the_proxy(cluster):
    with httpx.Client(base_url=cluster.url, trust_env=False, timeout=30) as c:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/health").status_code == 200  # probes need no key, as in the single process
        assert c.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == MODEL


@needs_ray
def test_requests_spread_over_both_replicas(http):
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 32, "ignore_eos": True, "temperature": 0}

    def one(_):
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.headers[ray_replica.REPLICA_HEADER], r.headers[ray_replica.PID_HEADER], r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(24)))
    replicas = {rid for rid, _, _ in results}
    assert len(replicas) == 2, f"all 24 requests went to {replicas}"
    assert len({pid for _, pid, _ in results}) == 2
    assert len({text for _, _, text in results}) == 1  # greedy: every replica says the same


# -- faults ----------------------------------------------------------------------------------------
@needs_ray
def test_sigkill_a_replica_in_flight_fail_later_succeed_deployment_heals(cluster, http):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 180, "stream": True, **SLOW}
    first_seen: dict[int, tuple[str, str]] = {}
    outcomes: dict[int, str] = {}
    started = threading.Barrier(5)

    def stream(i: int) -> None:
        try:
            with http.stream("POST", "/v1/completions", json=body, timeout=60) as r:
                lines = r.iter_lines()
                next(line for line in lines if line.startswith("data:"))
                first_seen[i] = (r.headers[ray_replica.REPLICA_HEADER], r.headers[ray_replica.PID_HEADER])
                started.wait(30)
                rest = [line for line in lines if line.startswith("data:")]
            final = json.loads(rest[-2].removeprefix("data: ")) if len(rest) >= 2 else {}
            done = rest[-1:] == ["data: [DONE]"] and "error" not in final
            outcomes[i] = "ok" if done and final["choices"][0]["finish_reason"] == "length" else "error"
        except (httpx.HTTPError, StopIteration, threading.BrokenBarrierError) as e:
            outcomes[i] = f"error: {type(e).__name__}"

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    started.wait(60)  # all four streams are running (two rows on each replica)
    by_pid = {pid for _, pid in first_seen.values()}
    assert len(by_pid) == 2, first_seen
    victim = sorted(by_pid)[0]
    os.kill(int(victim), signal.SIGKILL)
    t0 = time.monotonic()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a stream hung after its replica died"
    assert time.monotonic() - t0 < 60
    on_victim = [i for i, (_, pid) in first_seen.items() if pid == victim]
    assert on_victim and all(outcomes[i] != "ok" for i in on_victim), (outcomes, first_seen)
    # the other replica's streams are untouched: each runs to its full length
    on_survivor = [i for i, (_, pid) in first_seen.items() if pid != victim]
    assert on_survivor and all(outcomes[i] == "ok" for i in on_survivor), (outcomes, first_seen)

    # later requests succeed (the router learns the replica is gone)...
    plain = {"model": MODEL, "prompt": "hi", "max_tokens": 8, "temperature": 0}
    for _ in range(6):
        r = http.post("/v1/completions", json=plain)
        assert r.status_code == 200, r.text
        assert r.headers[ray_replica.PID_HEADER] != victim
    # ...and Ray brings the deployment back to two healthy replicas
    wait_for(lambda: ray_driver.running_replicas() == 2, 120, "two healthy replicas again")
    pids = set()
    wait_for(lambda: pids.add(http.post("/v1/completions", json=plain).headers[ray_replica.PID_HEADER]) or len(pids) >= 2,
             60, "both replicas serving")
    assert victim not in pids


@needs_ray
def test_a_replica_that_cannot_load_fails_the_deploy(cluster, pair_engine, tmp_path):
    bad = tmp_path / "broken"
    shutil.copytree(pair_engine, bad)
    (bad / Manifest.load(bad).role("target").onnx).write_bytes(b"not onnx")  # passes the driver's check
    config = ServerSettings(engines=str(bad), backend="ort", model_name="broken")
    options = ray_replica.RayOptions(num_replicas=1, num_cpus=0.25, max_constructor_retry_count=1)
    t0 = time.monotonic()
    with pytest.raises(MtadError, match="failed"):
        ray_driver.deploy(ray_replica.deployment(config, options), name="broken", route_prefix="/broken", timeout_s=90)
    assert time.monotonic() - t0 < 90
    wait_for(lambda: "broken" not in serve.status().applications, 30, "the failed app to be deleted")


@needs_ray
def test_the_proxy_answers_429_past_the_queue_limit(cluster, pair_engine):
    """One replica running one request with one more queued at Ray's proxy: the rest of a burst
    get 429 with Retry-After from the proxy (Ray's backpressure), none of them hangs or fails.

    How many of the burst get through is Ray's router's business and not exact: its view of the
    replica's queue lags (a CI run saw the warm-up request still counted, so only one of six got
    in). What is ours to hold: some are served, the rest are refused fast with Retry-After."""
    config = ServerSettings(engines=str(pair_engine), backend="ort", model_name="tight", max_batch=1)
    options = ray_replica.RayOptions(num_replicas=1, num_cpus=0.25, max_ongoing_requests=1, max_queued_requests=1)
    ray_driver.deploy(ray_replica.deployment(config, options), name="tight", route_prefix="/tight", timeout_s=120)
    body = {"model": "tight", "prompt": "Once upon a time", "max_tokens": 120, **SLOW}
    try:
        with httpx.Client(base_url=cluster.url + "/tight", trust_env=False, timeout=120) as c:
            assert c.post("/v1/completions", json={**body, "max_tokens": 2}).status_code == 200
            with ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(lambda _: c.post("/v1/completions", json=body), range(6)))
        codes = sorted(r.status_code for r in answers)
        assert set(codes) == {200, 429} and codes.count(429) >= 3, codes  # capacity is 2: most are refused
        assert all(r.headers.get("retry-after") for r in answers if r.status_code == 429)
    finally:
        serve.delete("tight")


# -- the command line ------------------------------------------------------------------------------
def _cli(*args: str, timeout: float = 60, env_: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtad_trt.cli", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, env=env_ or env(), cwd=ROOT)


def test_missing_ray_names_the_extra(pair_engine):
    code = ("import sys; sys.modules['ray'] = None; from mtad_trt.cli import main; "
            f"sys.argv = ['mtad-trt', 'serve', '--engines', {str(pair_engine)!r}, '--replicas', '2']; main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env(), cwd=ROOT)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[-1]]  # one line
    assert "pip install 'mtad-trt[ray]'" in r.stderr


def test_bad_engine_folder_is_refused_before_any_cluster(tmp_path):
    t0 = time.monotonic()
    r = _cli("--engines", str(tmp_path / "missing"), "--replicas", "2")
    assert r.returncode == 1 and r.stderr.startswith("error: engine folder") and "does not exist" in r.stderr
    assert time.monotonic() - t0 < 20


def test_ray_address_needs_replicas(pair_engine):
    r = _cli("--engines", str(pair_engine), "--ray-address", "127.0.0.1:1")
    assert r.returncode == 2 and "--ray-address needs --replicas" in r.stderr


@needs_ray
def test_unreachable_ray_address_is_a_clear_error_within_seconds(pair_engine):
    t0 = time.monotonic()
    r = _cli("--engines", str(pair_engine), "--replicas", "2", "--ray-address", f"127.0.0.1:{_free_port()}")
    assert r.returncode == 1
    assert "error: cannot reach the Ray cluster at 127.0.0.1:" in r.stderr
    assert time.monotonic() - t0 < 20


def test_watchdog_fails_health_when_the_runtime_is_wedged_or_dead():
    now = [0.0]
    client = SimpleNamespace(died=False, running=0)
    seen = []
    inner = SimpleNamespace(waiting=seen.append, iteration=lambda r, s: seen.append((r, s)),
                            started=seen.append, tokens=lambda *a: seen.append(a))
    dog = ray_replica.RuntimeWatchdog(inner, client, timeout_s=10, clock=lambda: now[0])
    now[0] = 100.0
    dog.check()  # idle for a long time: healthy
    dog.waiting(1)  # work arrives: the clock starts now
    now[0] = 105.0
    dog.check()
    client.running = 1
    dog.iteration(1, 0.1)
    now[0] = 114.0
    dog.check()  # 9 s since the last iteration
    now[0] = 116.0
    with pytest.raises(RuntimeError, match="wedged"):
        dog.check()
    dog.tokens("h", 3, 1.0)  # forwarded to the metrics
    assert seen == [1, (1, 0.1), ("h", 3, 1.0)]
    client.running, dog._waiting = 0, 0
    dog.check()  # work finished: healthy again
    client.died = True
    with pytest.raises(RuntimeError, match="stopped"):
        dog.check()


def test_replica_settings_and_deployment_options(pair_engine):
    cfg = ServerSettings.from_dict({"engines": str(pair_engine), "max_batch": 8, "drain_timeout_s": 12})
    opts = ray_replica.RayOptions(num_replicas=3, num_gpus=1).deployment_options(cfg)
    assert opts["max_ongoing_requests"] == 8  # the replica's batch, not Ray's default of 5
    assert opts["graceful_shutdown_timeout_s"] == 12 and opts["num_replicas"] == 3
    assert opts["ray_actor_options"]["num_gpus"] == 1
    auto = ray_replica.RayOptions(autoscaling_config={"min_replicas": 1, "max_replicas": 4}).deployment_options(cfg)
    assert auto["num_replicas"] == "auto" and auto["autoscaling_config"]["max_replicas"] == 4
    with pytest.raises(MtadError, match="unknown mtad-trt server setting"):
        ServerSettings.from_dict({"engines": "x", "max_btach": 2})
    assert cfg.served_name("fallback") == pair_engine.name


@needs_ray
def test_example_serve_config_is_valid_and_builds(pair_engine):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    conf = yaml.safe_load((Path(ROOT) / "examples" / "serve_config.yaml").read_text())
    app = ServeDeploySchema(**conf).applications[0]
    assert app.import_path == "mtad_trt.serve.ray_replica:build_app"
    assert app.deployments[0].name == ray_replica.DEPLOYMENT_NAME
    assert app.deployments[0].max_ongoing_requests == app.args["max_batch"]
    built = ray_replica.build_app({**app.args, "engines": str(pair_engine)})
    assert built.__class__.__name__ == "Application"
    with pytest.raises(MtadError, match="does not exist"):
        ray_replica.build_app(app.args)  # /models/... is not here: refused before anything deploys


def test_package_imports_without_ray():
    code = "import sys; sys.modules['ray'] = None; import mtad_trt.serve, mtad_trt.serve.ray_replica, mtad_trt.serve.ray_driver, mtad_trt.cli"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr


@needs_ray
def test_cli_joins_an_existing_cluster_and_drains_on_sigterm(cluster, pair_engine, tmp_path):
    """One command on an existing cluster: it deploys its own app, serves, and on SIGTERM deletes
    it after the in-flight request finished (Ray drains the replica)."""
    serve.delete(ray_driver.APP_NAME)  # free the route and the CPUs of the module's two replicas
    log = tmp_path / "cli.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mtad_trt.cli", "serve", "--engines", str(pair_engine),
                                 "--replicas", "1", "--ray-address", cluster.gcs, "--port", str(cluster.port),
                                 "--backend", "ort", "--cpus-per-replica", "0.5", "--model-name", MODEL,
                                 "--drain-timeout", "20"], env=env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is not None or "serving" in log.read_text(), 120, "the CLI to deploy")
        assert proc.poll() is None, log.read_text()
        with httpx.Client(base_url=cluster.url, trust_env=False, timeout=60) as c:
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 180, "stream": True, **SLOW}
            with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data:"))
                proc.send_signal(signal.SIGTERM)
                rest = [first, *(line for line in lines if line.startswith("data:"))]
        assert rest[-1] == "data: [DONE]", log.read_text()
        final = json.loads(rest[-2].removeprefix("data: "))
        assert final["choices"][0]["finish_reason"] == "length" and final["mtad"]["generated_tokens"] == 180
        assert proc.wait(60) == 0, log.read_text()
        assert ray_driver.APP_NAME not in serve.status().applications
        assert ray.is_initialized()  # the CLI left the cluster it joined running
    finally:
        if proc.poll() is None:
            proc.kill()
