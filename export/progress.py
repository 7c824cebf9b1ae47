"""Long export work, made visible: per-stage time and peak RSS for the manifest, progress lines with an ETA."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

Say = Callable[[str], None]


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM) since the last `reset_peak_rss`."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024


def current_rss_bytes() -> int:
    return (_status_kb("VmRSS") or 0) * 1024


def reset_peak_rss() -> None:
    """Linux resets VmHWM to the current RSS on writing 5 to clear_refs; elsewhere the peak stays."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


@contextmanager
def stage(name: str, record: dict | None):
    """Time a stage and record its peak RSS, and the RSS it started from (what it added is the difference)."""
    if record is None:
        yield
        return
    gc.collect()
    reset_peak_rss()
    start = current_rss_bytes()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        gc.collect()
        record[name] = {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak_rss_bytes() / 2**20),
                        "start_rss_mb": round(start / 2**20)}


class Eta:
    """Progress lines at most every `every` seconds: what is done, of how much, time left."""

    def __init__(self, say: Say, what: str, every: float = 5.0, unit: str = "") -> None:
        self.say, self.what, self.every, self.unit = say, what, every, unit
        self.t0 = self.last = time.perf_counter()

    def __call__(self, item: str, done: float, total: float) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and done < total:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        left = (total - done) / rate if rate > 0 else float("nan")
        if self.unit == "params":
            amount = f"{done / 1e9:.2f} of {total / 1e9:.2f} G parameters"
        else:
            amount = f"{done:g} of {total:g}{self.unit}"
        self.say(f"{self.what}: {100 * done / max(total, 1):.0f}% ({amount}), {_duration(left)} left; at {item}")


def size_text(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.0f}s"
