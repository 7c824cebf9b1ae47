"""Helpers for tests that start a real server process."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import httpx


def wait_healthy(client: httpx.Client, proc: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    """Poll /health until the server answers 200; fail with its log if it exits or never does."""
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def stopped_cleanly(proc: subprocess.Popen, log: Path, seconds: float) -> None:
    """After SIGTERM: the server exits within `seconds`, without a traceback. uvicorn re-raises the
    signal after a graceful shutdown, so the status may say SIGTERM."""
    proc.wait(seconds)
    assert proc.returncode in (0, -signal.SIGTERM), log.read_text()
    assert "Traceback" not in log.read_text()
