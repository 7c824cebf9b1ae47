"""What every energy meter shares: the reading, the interface, window bookkeeping, background
sampling, and the meter that measures nothing (and says why)."""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from mtad_trt.errors import MtadError

Clock = Callable[[], float]
_M = TypeVar("_M", bound="WindowMeter")


@dataclass(frozen=True)
class EnergyReading:
    """Energy over one window. joules/avg_w are None when the meter could not measure."""

    joules: float | None
    seconds: float
    avg_w: float | None
    peak_w: float | None
    method: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.joules is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "joules": self.joules,
            "seconds": self.seconds,
            "avg_w": self.avg_w,
            "peak_w": self.peak_w,
            "method": self.method,
            "details": dict(self.details),
        }


@runtime_checkable
class EnergyMeter(Protocol):
    """What benchmarks depend on. `method` says how the energy is measured and at what rate."""

    name: str
    method: str

    def start(self) -> None:
        """Begin a window (syncs the device first)."""

    def read(self) -> EnergyReading:
        """Energy since start() without ending the window (e.g. at the first token)."""

    def stop(self) -> EnergyReading:
        """End the window (syncs the device first) and return its energy."""

    def close(self) -> None:
        """Release threads, subprocesses and NVML."""


@dataclass
class Measurement:
    """Filled by `measure()` when its block exits."""

    reading: EnergyReading | None = None


@contextmanager
def measure(meter: EnergyMeter) -> Iterator[Measurement]:
    """`with measure(meter) as m: work()` then `m.reading`; stops the window even on errors."""
    m = Measurement()
    meter.start()
    try:
        yield m
    finally:
        m.reading = meter.stop()


def integrate_trapezoid(times: Sequence[float], watts: Sequence[float]) -> float:
    """∫ P dt by the trapezoid rule over (time s, power W) samples; 0 J for fewer than two."""
    if len(times) != len(watts):
        raise ValueError(f"{len(times)} times but {len(watts)} power values")
    total = 0.0
    for i in range(1, len(times)):
        total += (times[i] - times[i - 1]) * (watts[i] + watts[i - 1]) / 2.0
    return total


class WindowMeter(abc.ABC):
    """start/read/stop bookkeeping shared by all meters; subclasses implement the hooks."""

    name = "meter"
    method = ""

    def __init__(self, sync: Callable[[], Any] | None = None, clock: Clock = time.perf_counter) -> None:
        self._sync = sync
        self._clock = clock
        self._t0: float | None = None
        self._closed = False

    # hooks ------------------------------------------------------------------------------
    def _begin(self, t0: float) -> None:  # noqa: B027 - optional hook, no-op by default
        """Take the start-of-window readings."""

    @abc.abstractmethod
    def _reading(self, t0: float, t: float, final: bool) -> EnergyReading:
        """The window's energy so far (final=True at stop())."""

    def _end(self) -> None:  # noqa: B027 - optional hook
        """Stop per-window threads."""

    def _release(self) -> None:  # noqa: B027 - optional hook
        """Release long-lived resources (close())."""

    # interface --------------------------------------------------------------------------
    def _do_sync(self) -> None:
        if self._sync is not None:
            self._sync()

    def start(self) -> None:
        if self._closed:
            raise MtadError(f"{self.name} energy meter is closed")
        if self._t0 is not None:
            raise MtadError(f"{self.name} energy meter: start() called twice without stop()")
        self._do_sync()
        t0 = self._clock()
        self._begin(t0)
        self._t0 = t0

    def _started(self) -> float:
        if self._t0 is None:
            raise MtadError(f"{self.name} energy meter: call start() first")
        return self._t0

    def read(self) -> EnergyReading:
        t0 = self._started()
        self._do_sync()
        return self._reading(t0, self._clock(), final=False)

    def stop(self) -> EnergyReading:
        t0 = self._started()
        self._do_sync()
        try:
            return self._reading(t0, self._clock(), final=True)
        finally:
            self._t0 = None
            self._end()

    def close(self) -> None:
        if self._closed:
            return
        if self._t0 is not None:
            self._t0 = None
            self._end()
        self._closed = True
        self._release()

    def __enter__(self: _M) -> _M:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.method}>"


def average_watts(joules: float, seconds: float) -> float | None:
    return joules / seconds if seconds > 0 else None


class Sampler:
    """Calls `source()` (watts per channel) at `hz` in a daemon thread; keeps (t, values) pairs.

    Each timestamp is the midpoint of the read, so slow reads (an I2C round trip) do not skew
    the integral. Reads are serialized: a synchronous read at a window edge never overlaps a
    background one, so each midpoint belongs to exactly one read of the sensor. A failed
    background read is counted and skipped; a failed synchronous read (window edges) raises,
    because the window would otherwise be wrong without anyone knowing.
    """

    def __init__(self, source: Callable[[], Mapping[str, float]], hz: float, clock: Clock) -> None:
        self._source = source
        self.hz = hz
        self._clock = clock
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.errors = 0
        self.last_error: str | None = None

    def sample(self) -> float:
        """Take one sample now and return its timestamp."""
        with self._read_lock:
            ta = self._clock()
            values = {k: float(v) for k, v in self._source().items()}
            tb = self._clock()
            t = (ta + tb) / 2.0
            with self._lock:
                self.samples.append((t, values))
        return t

    def _run(self) -> None:
        period = 1.0 / self.hz
        next_t = time.monotonic() + period
        while not self._stop.wait(max(0.0, next_t - time.monotonic())):
            try:
                self.sample()
            except Exception as e:  # keep sampling; reported in details
                self.errors += 1
                self.last_error = repr(e)
            next_t += period
            now = time.monotonic()
            if next_t < now:  # fell behind (slow reads): do not burst to catch up
                next_t = now + period

    def begin(self) -> None:
        with self._lock:
            self.samples = []
        self.errors, self.last_error = 0, None
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="mtad-energy-sampler", daemon=True)
        self._thread.start()

    def end(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def drop_after(self, t: float) -> None:
        """Forget samples the thread took after the window's last edge (kept records = integral)."""
        with self._lock:
            self.samples = [s for s in self.samples if s[0] <= t]

    def snapshot(self) -> list[tuple[float, dict[str, float]]]:
        # Sorted: a background and a synchronous read can interleave and append out of order.
        with self._lock:
            return sorted(self.samples, key=lambda s: s[0])


def sampling_details(samples: list[tuple[float, dict[str, float]]], sampler: Sampler) -> dict[str, Any]:
    span = samples[-1][0] - samples[0][0] if len(samples) > 1 else 0.0
    d: dict[str, Any] = {
        "samples": len(samples),
        "requested_hz": sampler.hz,
        "achieved_hz": (len(samples) - 1) / span if span > 0 else None,
    }
    if sampler.errors:
        d["sample_errors"] = sampler.errors
        d["last_sample_error"] = sampler.last_error
    return d


class PowerSamplingMeter(WindowMeter):
    """Integrates a power source sampled in a background thread (trapezoid rule).

    `read_watts()` returns the power in W, either one number or a mapping of channel -> W (e.g.
    Jetson rails). `total(channels)` turns a sample into the window's total power; by default a
    single channel is the total and several are summed. Samples are also taken synchronously at
    start and at every read()/stop(), so the integral covers the whole window. Per-channel
    energies go to `details["channels_j"]`. Inject `read_watts` and `clock` to test it.
    """

    name = "power-sampling"

    def __init__(
        self,
        read_watts: Callable[[], float | Mapping[str, float]],
        *,
        hz: float = 20.0,
        method: str | None = None,
        name: str | None = None,
        total: Callable[[Mapping[str, float]], float] | None = None,
        sync: Callable[[], Any] | None = None,
        clock: Clock = time.perf_counter,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(sync, clock)
        if not hz > 0:
            raise MtadError(f"sampling rate must be > 0 Hz, got {hz}")
        if name is not None:
            self.name = name
        self._read_watts = read_watts
        self._total = total
        self.method = method or f"power sampled at {hz:g} Hz in a background thread, trapezoid-integrated"
        self._static_details = dict(details or {})
        self._sampler = Sampler(self._channels, hz, clock)

    def _channels(self) -> dict[str, float]:
        v = self._read_watts()
        if isinstance(v, Mapping):
            return {str(k): float(x) for k, x in v.items()}
        return {"total": float(v)}

    def _total_of(self, ch: Mapping[str, float]) -> float:
        if self._total is not None:
            return float(self._total(ch))
        return float(sum(ch.values()))

    def _begin(self, t0: float) -> None:  # noqa: B027 - optional hook, no-op by default
        try:
            self._sampler.begin()
        except MtadError:
            raise
        except Exception as e:
            raise MtadError(f"{self.name}: reading power failed at window start: {e}") from e

    def _end(self) -> None:  # noqa: B027 - optional hook
        self._sampler.end()

    def _extra_details(self, final: bool) -> dict[str, Any]:
        return {}

    def _reading(self, t0: float, t: float, final: bool) -> EnergyReading:
        # Sample first, then stop the thread: joining it can wait a GIL switch interval (5 ms),
        # which would otherwise stretch the window. Later thread samples are dropped.
        try:
            t_end = self._sampler.sample()
        except Exception as e:
            if final:
                self._sampler.end()
            raise MtadError(f"{self.name}: reading power failed at window end: {e}") from e
        if final:
            self._sampler.end()
            self._sampler.drop_after(t_end)
        samples = [s for s in self._sampler.snapshot() if s[0] <= t_end]
        times = [s[0] for s in samples]
        totals = [self._total_of(s[1]) for s in samples]
        joules = integrate_trapezoid(times, totals)
        details = dict(self._static_details)
        details.update(sampling_details(samples, self._sampler))
        channels = sorted({k for _, ch in samples for k in ch})
        if len(channels) > 1:
            details["channels_j"] = {
                c: integrate_trapezoid(times, [ch.get(c, 0.0) for _, ch in samples]) for c in channels
            }
        details.update(self._extra_details(final))
        # The window is the span the samples cover (first sample right after start, last one
        # right after stop/read), so joules, seconds and avg_w agree with each other.
        seconds = t_end - times[0]
        return EnergyReading(joules, seconds, average_watts(joules, seconds), max(totals), self.method, details)


def describe_error(e: BaseException) -> str:
    return str(e) or type(e).__name__


def read_int(path: Path | str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def read_text(path: Path | str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


class NullMeter(WindowMeter):
    """Measures time only; every reading says plainly why there is no energy."""

    name = "none"

    def __init__(self, reason: str, clock: Clock = time.perf_counter) -> None:
        super().__init__(None, clock)
        self.reason = reason
        self.method = f"unavailable: {reason}"

    def _reading(self, t0: float, t: float, final: bool) -> EnergyReading:
        return EnergyReading(None, t - t0, None, None, self.method, {"reason": self.reason})


