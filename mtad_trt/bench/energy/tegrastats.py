"""Jetson's `tegrastats --interval <ms>`: rail power parsed from its lines (where sysfs rails are
not readable)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtad_trt.bench.energy.base import (
    Clock,
    EnergyReading,
    WindowMeter,
    average_watts,
    describe_error,
    integrate_trapezoid,
)
from mtad_trt.bench.energy.jetson import read_clocks, read_nvpmodel, total_rule
from mtad_trt.errors import MtadError

# tegrastats

# A rail is "NAME cur/avg" with optional mW units and nothing glued after (so "RAM 2448/7620MB"
# and "IRAM 0/252kB" are not rails). Covers "VDD_IN 5012mW/5012mW" (L4T 34+),
# "POM_5V_IN 3000/3000" (L4T 32 Nano/TX) and "GPU 0/0 CPU 308/308" (L4T 32 Xavier).
_RAIL_RE = re.compile(r"(?<![\w@/])([A-Za-z][A-Za-z0-9_]*)\s+(\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_RAM_RE = re.compile(r"\bRAM (\d+)/(\d+)MB")
_GR3D_RE = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?(\d+))?")
_EMC_RE = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_CPU_RE = re.compile(r"\bCPU \[([^\]]*)\]")
_TS_RE = re.compile(r"^(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s")


@dataclass(frozen=True)
class TegrastatsSample:
    """One tegrastats line. Rail powers in mW: current value and tegrastats' running average."""

    rails_mw: dict[str, int]
    rails_avg_mw: dict[str, int]
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    gpu_util_pct: int | None = None
    gpu_mhz: int | None = None
    emc_util_pct: int | None = None
    emc_mhz: int | None = None
    cpu: tuple[tuple[int, int] | None, ...] = ()  # (util %, MHz) per core; None = off
    timestamp: str | None = None  # "MM-DD-YYYY HH:MM:SS" on newer L4T


def parse_tegrastats_line(line: str) -> TegrastatsSample:
    """Parse one `tegrastats` line; fields that are absent stay None (rails empty if none)."""
    rails: dict[str, int] = {}
    avgs: dict[str, int] = {}
    for m in _RAIL_RE.finditer(line):
        rails[m.group(1)] = int(m.group(2))
        avgs[m.group(1)] = int(m.group(3))
    kw: dict[str, Any] = {}
    if m := _RAM_RE.search(line):
        kw["ram_used_mb"], kw["ram_total_mb"] = int(m.group(1)), int(m.group(2))
    if m := _GR3D_RE.search(line):
        kw["gpu_util_pct"] = int(m.group(1))
        kw["gpu_mhz"] = int(m.group(2)) if m.group(2) else None
    if m := _EMC_RE.search(line):
        kw["emc_util_pct"] = int(m.group(1))
        kw["emc_mhz"] = int(m.group(2)) if m.group(2) else None
    if m := _CPU_RE.search(line):
        cores: list[tuple[int, int] | None] = []
        for item in m.group(1).split(","):
            cm = re.fullmatch(r"\s*(\d+)%@(\d+)\s*", item)
            cores.append((int(cm.group(1)), int(cm.group(2))) if cm else None)
        kw["cpu"] = tuple(cores)
    if m := _TS_RE.match(line):
        kw["timestamp"] = m.group(1)
    return TegrastatsSample(rails_mw=rails, rails_avg_mw=avgs, **kw)


class TegrastatsMeter(WindowMeter):
    """Jetson power from a running `tegrastats --interval <ms>`; rails parsed from each line.

    tegrastats starts when the meter opens and runs until close(), so windows do not pay its
    start-up delay. Each line is timestamped on arrival; the window integrates the lines inside
    it (trapezoid), holding the last value before start() and the latest value at stop().
    Resolution is the interval (default 100 ms). stdout is line-buffered with `stdbuf -oL` where
    available, since a block-buffered pipe would bunch lines up and blur their times.
    """

    name = "tegrastats"

    def __init__(
        self,
        interval_ms: int = 100,
        *,
        command: Sequence[str] | None = None,
        total: str = "auto",
        sync: Callable[[], Any] | None = None,
        first_sample_timeout_s: float = 5.0,
        record_power_mode: bool = True,
        root: str | Path = "/",
        clock: Clock = time.perf_counter,
    ) -> None:
        super().__init__(sync, clock)
        if interval_ms < 1:
            raise MtadError(f"tegrastats interval must be >= 1 ms, got {interval_ms}")
        if command is None:
            exe = shutil.which("tegrastats")
            if exe is None:
                raise MtadError(
                    "tegrastats unavailable: not on PATH (not a Jetson, or L4T tools not installed)"
                )
            command = [exe, "--interval", str(int(interval_ms))]
            if shutil.which("stdbuf"):
                command = ["stdbuf", "-oL", *command]
        self._root = str(root)
        self.interval_ms = interval_ms
        self._lock = threading.Lock()
        self._last: tuple[float, TegrastatsSample] | None = None
        self._window: list[tuple[float, TegrastatsSample]] | None = None
        self._first = threading.Event()
        self._lines = 0
        try:
            self._proc = subprocess.Popen(
                list(command),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                text=True,
                bufsize=1,
                start_new_session=True,
            )
        except OSError as e:
            raise MtadError(f"tegrastats unavailable: could not start {command[0]}: {describe_error(e)}") from e
        self._reader = threading.Thread(target=self._read_lines, name="mtad-tegrastats", daemon=True)
        self._reader.start()
        if not self._first.wait(first_sample_timeout_s):
            self._release()
            raise MtadError(
                f"tegrastats unavailable: no power rails in its output within {first_sample_timeout_s:g} s"
            )
        assert self._last is not None
        labels = list(self._last[1].rails_mw)
        try:
            self._total_fn, total_desc = total_rule(labels, total)
        except MtadError:
            self._release()
            raise
        self._details: dict[str, Any] = {"rails": labels, "total": total_desc, "interval_ms": interval_ms}
        if record_power_mode:
            self._details["power_mode"] = read_nvpmodel()
        self.method = (
            f"tegrastats --interval {interval_ms} (one line per {interval_ms} ms), rails trapezoid-"
            f"integrated over line arrival times; total = {total_desc}"
        )
        self._clocks0: dict[str, int] = {}

    def _read_lines(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            t = self._clock()
            sample = parse_tegrastats_line(line)
            if not sample.rails_mw:
                continue
            with self._lock:
                self._lines += 1
                self._last = (t, sample)
                if self._window is not None:
                    self._window.append((t, sample))
            self._first.set()

    def _watts(self, s: TegrastatsSample) -> float:
        return self._total_fn({k: v / 1000.0 for k, v in s.rails_mw.items()})

    def _begin(self, t0: float) -> None:  # noqa: B027 - optional hook, no-op by default
        if self._proc.poll() is not None:
            raise MtadError(f"tegrastats exited (status {self._proc.returncode})")
        self._clocks0 = read_clocks(self._root)
        with self._lock:
            assert self._last is not None
            self._window = [(t0, self._last[1])]  # hold the latest value back to the window start

    def _end(self) -> None:  # noqa: B027 - optional hook
        with self._lock:
            self._window = None

    def _reading(self, t0: float, t: float, final: bool) -> EnergyReading:
        with self._lock:
            pts = list(self._window or [])
            last = self._last
        assert last is not None
        if self._proc.poll() is not None:
            raise MtadError(f"tegrastats exited during the window (status {self._proc.returncode})")
        pts.append((t, last[1]))  # hold the latest value up to now
        times = [p[0] for p in pts]
        watts = [self._watts(p[1]) for p in pts]
        joules = integrate_trapezoid(times, watts)
        details = dict(self._details)
        details["lines"] = len(pts) - 2
        details["channels_j"] = {
            r: integrate_trapezoid(times, [p[1].rails_mw.get(r, 0) / 1000.0 for p in pts])
            for r in self._details["rails"]
        }
        details["clocks_start"] = self._clocks0
        details["clocks_end"] = read_clocks(self._root)
        gpu = [p[1].gpu_util_pct for p in pts[1:-1] if p[1].gpu_util_pct is not None]
        if gpu:
            details["gpu_util_pct_mean"] = sum(gpu) / len(gpu)
        seconds = t - t0
        return EnergyReading(joules, seconds, average_watts(joules, seconds), max(watts), self.method, details)

    def _release(self) -> None:  # noqa: B027 - optional hook
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                self._proc.terminate()
            try:
                self._proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._reader.join(timeout=2.0)


