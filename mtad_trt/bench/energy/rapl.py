"""CPUs: Linux powercap RAPL counters for the package (+DRAM), with wrap-around."""

from __future__ import annotations

import glob
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtad_trt.bench.energy.base import (
    Clock,
    EnergyReading,
    WindowMeter,
    average_watts,
    describe_error,
    read_int,
    read_text,
)
from mtad_trt.bench.energy.jetson import read_clocks
from mtad_trt.errors import MtadError


@dataclass(frozen=True)
class RaplZone:
    """One powercap zone ("package-0", "dram", ...): `energy_uj` wraps at `max_energy_range_uj`."""

    name: str
    path: Path
    max_range_uj: int

    @property
    def id(self) -> str:
        return self.path.name  # "intel-rapl:0", "intel-rapl:0:2"

    def read_uj(self) -> int:
        return read_int(self.path / "energy_uj")


def rapl_delta_uj(prev: int, cur: int, max_range_uj: int) -> int:
    """Counter increase from prev to cur, assuming at most one wrap at max_energy_range_uj.

    The convention of common tools (Zeus, CodeCarbon): prev -> max -> 0 -> cur adds
    max - prev + cur. (The true modulus is max + one hardware unit, ~61 µJ, which is noise.)
    Poll more often than the wrap period to keep "at most one wrap" true; RaplMeter does.
    """
    if cur >= prev:
        return cur - prev
    return cur + max_range_uj - prev


def find_rapl_zones(root: str | Path = "/", which: str = "auto") -> list[RaplZone]:
    """RAPL zones under `root`/sys/class/powercap. `which="auto"`: package-* zones plus dram
    subzones (core/uncore are inside the package; psys overlaps everything and is used only
    when nothing else exists). `which="all"`: every zone, overlaps included.
    """
    base = os.path.join(str(root), "sys/class/powercap")
    zones: list[RaplZone] = []
    for d in sorted(glob.glob(os.path.join(base, "intel-rapl:*"))):
        name = read_text(os.path.join(d, "name"))
        rng = read_text(os.path.join(d, "max_energy_range_uj"))
        if name is None or not os.path.exists(os.path.join(d, "energy_uj")):
            continue
        zones.append(RaplZone(name, Path(d), int(rng) if rng and rng.isdigit() else 0))
    if which == "all":
        return zones
    picked = [z for z in zones if z.name.startswith("package") or z.name == "dram"]
    if not picked:
        picked = [z for z in zones if z.name == "psys"]
    return picked


class RaplMeter(WindowMeter):
    """CPU energy from powercap RAPL `energy_uj` counters (package + DRAM).

    Counters are read at the window edges and polled in a thread at `poll_hz` (default 10 Hz):
    polling keeps wrap-around detectable (a 32-bit counter wraps every few minutes to an hour
    depending on load) and gives `peak_w` from counter differences. `poll_hz=None` disables the
    thread (edge reads only; call `poll()` yourself for long windows). On Linux >= 5.10
    `energy_uj` is root-only (CVE-2020-8694), so RAPL is often unavailable to normal users.
    """

    name = "rapl"

    def __init__(
        self,
        root: str | Path = "/",
        *,
        poll_hz: float | None = 10.0,
        zones: str = "auto",
        sync: Callable[[], Any] | None = None,
        clock: Clock = time.perf_counter,
    ) -> None:
        super().__init__(sync, clock)
        self._root = str(root)
        self.zones = find_rapl_zones(root, zones)
        if not self.zones:
            raise MtadError(
                f"RAPL unavailable: no {os.path.join(self._root, 'sys/class/powercap/intel-rapl:*')} zones "
                "(not Linux/x86, or the intel_rapl driver is not loaded)"
            )
        for z in self.zones:
            try:
                z.read_uj()
            except PermissionError as e:
                raise MtadError(
                    f"RAPL unavailable: {z.path / 'energy_uj'} is not readable (root-only since Linux 5.10, "
                    "CVE-2020-8694); run as root or grant read access"
                ) from e
            except (OSError, ValueError) as e:
                raise MtadError(f"RAPL unavailable: reading {z.path / 'energy_uj'} failed: {describe_error(e)}") from e
            if z.max_range_uj <= 0:
                raise MtadError(f"RAPL unavailable: {z.path / 'max_energy_range_uj'} is missing or zero")
        if poll_hz is not None and not poll_hz > 0:
            raise MtadError(f"RAPL poll rate must be > 0 Hz, got {poll_hz}")
        self.poll_hz = poll_hz
        self._lock = threading.Lock()
        self._prev: dict[str, int] = {}
        self._acc_uj: dict[str, int] = {}
        self._wraps = 0
        self._last_t = 0.0
        self._peak_w: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        names = ", ".join(f"{z.name} ({z.id})" for z in self.zones)
        poll = (
            f"polled at {poll_hz:g} Hz for wrap-around and peak W" if poll_hz else "read at window edges only"
        )
        self.method = (
            f"Linux powercap RAPL energy_uj counters [{names}], {poll}; CPU package/DRAM only, not a GPU"
        )

    def poll(self) -> None:
        """Fold the counters' increase since the last poll into the window (handles one wrap)."""
        with self._lock:
            t = self._clock()
            added = 0
            for z in self.zones:
                cur = z.read_uj()
                prev = self._prev[z.id]
                if cur < prev:
                    self._wraps += 1
                d = rapl_delta_uj(prev, cur, z.max_range_uj)
                self._acc_uj[z.id] += d
                self._prev[z.id] = cur
                added += d
            dt = t - self._last_t
            if dt >= 0.02:  # shorter intervals are dominated by the counter's ~1 ms update steps
                w = added / 1e6 / dt
                self._peak_w = w if self._peak_w is None else max(self._peak_w, w)
            self._last_t = t

    def _run(self) -> None:
        assert self.poll_hz is not None
        period = 1.0 / self.poll_hz
        while not self._stop.wait(period):
            try:
                self.poll()
            except (OSError, ValueError):
                pass  # a torn read; the next poll catches up (the counter is cumulative)

    def _begin(self, t0: float) -> None:  # noqa: B027 - optional hook, no-op by default
        with self._lock:
            try:
                self._prev = {z.id: z.read_uj() for z in self.zones}
            except (OSError, ValueError) as e:
                raise MtadError(f"RAPL read failed: {describe_error(e)}") from e
            self._acc_uj = {z.id: 0 for z in self.zones}
            self._wraps, self._peak_w, self._last_t = 0, None, self._clock()
        if self.poll_hz:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="mtad-rapl", daemon=True)
            self._thread.start()

    def _end(self) -> None:  # noqa: B027 - optional hook
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def _reading(self, t0: float, t: float, final: bool) -> EnergyReading:
        if final:
            self._end()
        try:
            self.poll()
        except (OSError, ValueError) as e:
            raise MtadError(f"RAPL read failed: {describe_error(e)}") from e
        with self._lock:
            acc = dict(self._acc_uj)
            wraps, peak = self._wraps, self._peak_w
        joules = sum(acc.values()) / 1e6
        details: dict[str, Any] = {
            "zones_j": {f"{z.name} ({z.id})": acc[z.id] / 1e6 for z in self.zones},
            "wraps": wraps,
            "clocks_end": read_clocks(self._root),
        }
        seconds = t - t0
        return EnergyReading(joules, seconds, average_watts(joules, seconds), peak, self.method, details)


