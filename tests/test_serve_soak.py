"""Soak: 2,000 short requests through a live `mtad-trt serve` process; its resident memory after
warm-up must not keep growing (everything the server, the runtime, the policy, the metrics and
the prefix cache keep is bounded)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from servers import stopped_cleanly, wait_healthy

pytestmark = pytest.mark.slow

PROMPTS = [f"Request {i}: tell me about the number {i * 7}." for i in range(20)]  # a fixed working set
DECODERS = ["ar", "mtad", "sps", "mmtad"]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_rss_stays_flat_over_2000_requests(pair_engine, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mtad_trt.cli", "serve", str(pair_engine), "--backend", "ort",
                                 "--port", str(port), "--max-batch", "4", "--threads", "1"],
                                env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=out, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=60) as c:
            wait_healthy(c, proc, log)

            def one(i: int) -> int:
                body = {"model": pair_engine.name, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 4,
                        "decoder": DECODERS[i % len(DECODERS)], "stream": i % 3 == 0, "seed": i}
                return c.post("/v1/completions", json=body).status_code

            with ThreadPoolExecutor(4) as pool:
                assert set(pool.map(one, range(300))) == {200}  # warm-up: shapes, pool, policy tables
                warm = rss_kib(proc.pid)
                assert set(pool.map(one, range(300, 2300))) == {200}
                after = rss_kib(proc.pid)
        assert after <= 1.05 * warm, f"RSS grew from {warm} to {after} KiB over 2,000 requests"
    finally:
        proc.terminate()
        stopped_cleanly(proc, log, 60)
