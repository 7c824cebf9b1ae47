#!/usr/bin/env python3
"""Ray Serve replicas against the single-process server, on one machine (docs/scale-out.md).

    python scripts/bench_ray.py [--engines DIR] [--max-batch 4] [--concurrency 1,4,16] \\
        [--requests 8] [--max-tokens 64] [--extra '{"decoder": "ar"}'] [--out docs/data/serve_ray.json]

Without --engines it exports the tests' tiny random pair (tests/tiny.py) into a temporary folder.
It runs, one after another on the same engine and settings:

1. `mtad-trt serve` (one process, --max-batch B) and scripts/bench_serve.py against it;
2. a local Ray cluster (small: --ray-cpus, no dashboard, a 100 MB object store) with Serve, then
   the same app with 1 and then 2 replicas (each --max-batch B), and bench_serve.py against Ray's proxy;
3. Ray's overhead per request: --overhead-n sequential non-streaming requests, alternating
   between the single-process server and a 1-replica deployment (both kept up), medians;
4. the memory of the idle cluster: proportional set size (PSS) of the Ray processes with Serve
   and no app, then with the two idle replicas.

It writes everything as JSON (--out) and prints the tables. It always stops what it started
(the server process, Serve, the Ray cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONWARNINGS": "ignore"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_engine(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from mtad_trt.export.pair import export_pair
    from tiny import make_tokenizer, save_tiny

    tok = make_tokenizer()
    target = save_tiny(folder / "target", "qwen2", layers=2, seed=1, tokenizer=tok)
    draft = save_tiny(folder / "draft", "qwen2", layers=1, seed=2, tokenizer=tok)
    out = folder / "tiny-pair"
    export_pair(str(draft), str(target), out, max_seq_len=512)
    return out


def wait_healthy(url: str, timeout_s: float = 180, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode})")
        try:
            if httpx.get(url + "/health", trust_env=False, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} did not become healthy")


def bench(url: str, args, label: str) -> dict:
    out = Path(tempfile.mkdtemp()) / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_serve.py"), "--url", url, "--concurrency", args.concurrency,
           "--requests", str(args.requests), "--max-tokens", str(args.max_tokens), "--ignore-eos",
           "--temperature", "0", "--extra", args.extra, "--json", str(out)]
    print(f"== {label}", flush=True)
    subprocess.run(cmd, check=True, env=ENV, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    for row in result["levels"]:
        print(f"   N={row['concurrency']:>2}: {row['output_tokens_per_s']:7.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:7.1f} "
              f"p99 {row['ttft_p99_ms']:7.1f} ms, errors {row['errors']}", flush=True)
    return result


def overhead(single: str, ray_url: str, n: int, extra: dict) -> dict:
    """Sequential non-streaming requests, alternating between the two servers: medians in ms."""
    body = {"model": "tiny-pair", "prompt": "def fib(n):", "max_tokens": 16, "ignore_eos": True, "temperature": 0,
            **extra}
    times: dict[str, list[float]] = {"single": [], "ray": []}
    with httpx.Client(trust_env=False, timeout=60) as c:
        for url in (single, ray_url):  # warm-up
            c.post(url + "/v1/completions", json=body).raise_for_status()
        for _ in range(n):
            for name, url in (("single", single), ("ray", ray_url)):
                t0 = time.perf_counter()
                c.post(url + "/v1/completions", json=body).raise_for_status()
                times[name].append(1000 * (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"requests_each": n, "max_tokens": 16, "single_ms_p50": med["single"], "ray_ms_p50": med["ray"],
            "ray_overhead_ms_p50": med["ray"] - med["single"]}


def ray_memory(driver_pid: int) -> dict:
    """PSS of every Ray process (GCS, raylet, agents, Serve controller and proxy, replicas), MiB."""
    total, per = 0, {}
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            name = p.info["name"] or "?"
            ours = name.startswith("ray::") or name in ("gcs_server", "raylet") or "site-packages/ray/" in cmd
            if p.info["pid"] == driver_pid or not ours:
                continue
            pss = p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "ServeReplica" in cmd or "ServeReplica" in name:
            name = "ServeReplica"
        per[name] = per.get(name, 0) + pss
        total += pss
    return {"total_mib": round(total / 2**20), "by_process_mib": {k: round(v / 2**20) for k, v in sorted(per.items())}}


def markdown(record: dict) -> str:
    """The tables docs/scale-out.md shows."""
    lines = ["| server | N clients | requests | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | e2e p50 (ms) | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, label in (("single", "single process"), ("ray_1", "Ray, 1 replica"), ("ray_2", "Ray, 2 replicas")):
        for r in record[key]["levels"]:
            lines.append(f"| {label} | {r['concurrency']} | {r['requests']} | {r['output_tokens_per_s']:.0f} | "
                         f"{r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | {r['itl_p50_ms']:.2f} | "
                         f"{r['e2e_p50_ms']:.0f} | {r['errors']} |")
    o = record["overhead"]
    lines += ["", f"Ray's overhead per request ({o['requests_each']} sequential non-streaming {o['max_tokens']}-token "
              f"requests each, alternating): single process p50 {o['single_ms_p50']:.1f} ms, through Ray's proxy "
              f"(1 replica) {o['ray_ms_p50']:.1f} ms: **+{o['ray_overhead_ms_p50']:.1f} ms** per request.", ""]
    for key, label in (("memory_idle_cluster_with_serve", "idle cluster with Serve (controller + proxy), no app"),
                       ("memory_idle_cluster_2_replicas", "idle cluster with two idle replicas")):
        m = record[key]
        parts = ", ".join(f"{k} {v}" for k, v in m["by_process_mib"].items())
        lines.append(f"- Memory (PSS), {label}: **{m['total_mib']} MiB** ({parts}).")
    lines.append(f"- Deploy time: 1 replica {record['deploy_s_1_replicas']} s, 2 replicas {record['deploy_s_2_replicas']} s "
                 "(process start, imports, engine load, health check).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", type=Path)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--extra", default='{"decoder": "ar"}', help="Extra request fields (JSON).")
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--cpus-per-replica", type=float, default=0.5)
    ap.add_argument("--overhead-n", type=int, default=40)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "data" / "serve_ray.json")
    args = ap.parse_args()

    import ray
    from ray import serve

    from mtad_trt.serve import ray_driver, ray_replica
    from mtad_trt.serve.settings import ServerSettings

    engines = args.engines or tiny_engine(Path(tempfile.mkdtemp(prefix="bench-ray-")))
    record: dict = {"engines": str(engines), "max_batch": args.max_batch, "max_tokens": args.max_tokens,
                    "requests_per_client": args.requests, "extra": json.loads(args.extra),
                    "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}
    single_port, ray_port = free_port(), free_port()
    single_url, ray_url = f"http://127.0.0.1:{single_port}", f"http://127.0.0.1:{ray_port}"
    server = subprocess.Popen([sys.executable, "-m", "mtad_trt.cli", "serve", "--engines", str(engines),
                               "--backend", "ort", "--port", str(single_port), "--max-batch", str(args.max_batch),
                               "--model-name", "tiny-pair"], env=ENV, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(single_url, proc=server)
        record["single"] = bench(single_url, args, "single process")
        server.send_signal(15)  # the load runs alone; it comes back for the overhead pairs
        server.wait(60)

        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, object_store_memory=100 << 20,
                 log_to_driver=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": ray_port})
            time.sleep(5)
            record["memory_idle_cluster_with_serve"] = ray_memory(os.getpid())
            config = ServerSettings(engines=str(engines), backend="ort", model_name="tiny-pair",
                                           max_batch=args.max_batch)
            for n in (1, 2):
                opts = ray_replica.RayOptions(num_replicas=n, num_cpus=args.cpus_per_replica)
                t0 = time.perf_counter()
                ray_driver.deploy(ray_replica.deployment(config, opts), timeout_s=300)
                record[f"deploy_s_{n}_replicas"] = round(time.perf_counter() - t0, 1)
                wait_healthy(ray_url)
                if n == 2:
                    time.sleep(5)
                    record["memory_idle_cluster_2_replicas"] = ray_memory(os.getpid())
                record[f"ray_{n}"] = bench(ray_url, args, f"Ray Serve, {n} replica(s)")
            ray_driver.deploy(ray_replica.deployment(config, ray_replica.RayOptions(num_replicas=1,
                                                                         num_cpus=args.cpus_per_replica)), timeout_s=300)
            server = subprocess.Popen([sys.executable, "-m", "mtad_trt.cli", "serve", "--engines", str(engines),
                                       "--backend", "ort", "--port", str(single_port), "--max-batch",
                                       str(args.max_batch), "--model-name", "tiny-pair"], env=ENV, cwd=ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_healthy(single_url, proc=server)
            wait_for_one = time.monotonic() + 60
            while ray_driver.running_replicas() != 1 and time.monotonic() < wait_for_one:
                time.sleep(0.5)
            record["overhead"] = overhead(single_url, ray_url, args.overhead_n, json.loads(args.extra))
            print("== overhead", record["overhead"], flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        if server.poll() is None:
            server.send_signal(15)
            server.wait(60)
    record["load_avg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(record))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
