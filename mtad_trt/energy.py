"""Energy meters behind one small interface: NVML, Jetson INA3221, tegrastats, RAPL, or none.

Why this exists: the MTAD paper's energy numbers come from polling `nvidia-smi` at about 1 Hz
and summing every GPU on the node (spec/mtad.md §6.1, §7 item 6). Here each meter measures one
window on one device, says exactly how (`method`, sampling rate), and `open_meter("auto")`
falls back step by step. A meter that cannot measure says so plainly ("unavailable: <why>")
instead of reporting 0 J.

Usage::

    meter = open_meter("auto", sync=torch.cuda.synchronize)
    meter.start()
    ...                          # run the workload
    first = meter.read()         # optional: energy so far (e.g. at the first token)
    reading = meter.stop()       # EnergyReading(joules, seconds, avg_w, peak_w, method, details)
    meter.close()

Meters, in the order `open_meter("auto")` tries them for a GPU run:

- `NvmlEnergyMeter`: the total-energy counter (`nvmlDeviceGetTotalEnergyConsumption`, mJ
  since driver load, Volta+), read at the window edges after `sync()` (as Zeus does). Exact up
  to the counter's update period; the peak comes from optional power sampling.
- `NvmlPowerMeter`: where the counter is NotSupported, `nvmlDeviceGetPowerUsage` sampled in a
  background thread (default 20 Hz) and trapezoid-integrated.
- `JetsonMeter`: INA3221 rails from sysfs, sampled in a thread (NVML power calls return
  NotSupported on Jetson). Records the nvpmodel power mode and clocks, which dominate results.
- `TegrastatsMeter`: parses `tegrastats --interval <ms>` lines.
- `RaplMeter`: Linux powercap RAPL counters for the CPU package (+DRAM), with wrap-around.
- `NullMeter`: no energy; `joules` is None and `method` is "unavailable: <why>".

All NVML access is lazy (`pynvml` from nvidia-ml-py is imported only when a NVML meter opens).
Filesystem roots are parameters so tests use fake sysfs trees. The caller synchronises the
device: pass `sync` (e.g. `torch.cuda.synchronize`) so queued kernels land inside the window.
"""

from __future__ import annotations

import abc
import glob
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from mtad_trt.errors import MtadError
from mtad_trt.metrics import decode_joules_per_token, joules_per_token, tokens_per_joule

__all__ = [
    "KINDS",
    "EnergyMeter",
    "EnergyReading",
    "JetsonMeter",
    "JetsonRail",
    "Measurement",
    "NullMeter",
    "NvmlEnergyMeter",
    "NvmlPowerMeter",
    "PowerSamplingMeter",
    "RaplMeter",
    "RaplZone",
    "TegrastatsMeter",
    "TegrastatsSample",
    "decode_joules_per_token",
    "find_jetson_rails",
    "find_rapl_zones",
    "integrate_trapezoid",
    "joules_per_token",
    "measure",
    "open_meter",
    "open_nvml_meter",
    "parse_nvpmodel",
    "parse_tegrastats_line",
    "rapl_delta_uj",
    "read_clocks",
    "read_nvpmodel",
    "tokens_per_joule",
]

KINDS = ("auto", "nvml", "jetson", "tegrastats", "rapl", "none")

# Rails that measure the whole module's input; when present they are the total (the others are
# parts of it, so summing would double count). Without one (AGX Orin, AGX Xavier) we sum rails.
TOTAL_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")

Clock = Callable[[], float]
_M = TypeVar("_M", bound="_WindowMeter")


# --------------------------------------------------------------------------------------------
# Reading and interface
# --------------------------------------------------------------------------------------------


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


class _WindowMeter(abc.ABC):
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


def _avg(joules: float, seconds: float) -> float | None:
    return joules / seconds if seconds > 0 else None


# --------------------------------------------------------------------------------------------
# Sampling in a background thread
# --------------------------------------------------------------------------------------------


class _Sampler:
    """Calls `source()` (watts per channel) at `hz` in a daemon thread; keeps (t, values) pairs.

    Each timestamp is the midpoint of the read, so slow reads (an I2C round trip) do not skew
    the integral. A failed background read is counted and skipped; a failed synchronous read
    (window edges) raises, because the window would otherwise be wrong without anyone knowing.
    """

    def __init__(self, source: Callable[[], Mapping[str, float]], hz: float, clock: Clock) -> None:
        self._source = source
        self.hz = hz
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.errors = 0
        self.last_error: str | None = None

    def sample(self) -> float:
        """Take one sample now and return its timestamp."""
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

    def snapshot(self) -> list[tuple[float, dict[str, float]]]:
        # Sorted: a background and a synchronous read can interleave and append out of order.
        with self._lock:
            return sorted(self.samples, key=lambda s: s[0])


def _sampling_details(samples: list[tuple[float, dict[str, float]]], sampler: _Sampler) -> dict[str, Any]:
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


class PowerSamplingMeter(_WindowMeter):
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
        self._sampler = _Sampler(self._channels, hz, clock)

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
        samples = [s for s in self._sampler.snapshot() if s[0] <= t_end]
        times = [s[0] for s in samples]
        totals = [self._total_of(s[1]) for s in samples]
        joules = integrate_trapezoid(times, totals)
        details = dict(self._static_details)
        details.update(_sampling_details(samples, self._sampler))
        channels = sorted({k for _, ch in samples for k in ch})
        if len(channels) > 1:
            details["channels_j"] = {
                c: integrate_trapezoid(times, [ch.get(c, 0.0) for _, ch in samples]) for c in channels
            }
        details.update(self._extra_details(final))
        # The window is the span the samples cover (first sample right after start, last one
        # right after stop/read), so joules, seconds and avg_w agree with each other.
        seconds = t_end - times[0]
        return EnergyReading(joules, seconds, _avg(joules, seconds), max(totals), self.method, details)


# --------------------------------------------------------------------------------------------
# NVML
# --------------------------------------------------------------------------------------------


def _import_nvml(nvml: Any | None) -> Any:
    if nvml is not None:
        return nvml
    try:
        import pynvml  # nvidia-ml-py; lazy so that CPU-only installs never need it
    except ImportError as e:
        raise MtadError(
            "NVML unavailable: the nvidia-ml-py package is not installed (pip install nvidia-ml-py)"
        ) from e
    return pynvml


def _err(e: BaseException) -> str:
    return str(e) or type(e).__name__


class _NvmlDevice:
    """nvmlInit + one device handle. NVML reference-counts init/shutdown, so each meter pairs them."""

    def __init__(self, gpu: int | str, nvml: Any | None) -> None:
        self.nvml = _import_nvml(nvml)
        try:
            self.nvml.nvmlInit()
        except Exception as e:
            raise MtadError(f"NVML unavailable: nvmlInit failed: {_err(e)}") from e
        self.closed = False
        try:
            if isinstance(gpu, int):
                self.handle = self.nvml.nvmlDeviceGetHandleByIndex(gpu)
            elif gpu.startswith(("GPU-", "MIG-")):
                self.handle = self.nvml.nvmlDeviceGetHandleByUUID(gpu)
            else:
                self.handle = self.nvml.nvmlDeviceGetHandleByPciBusId(gpu)
        except Exception as e:
            self.close()
            raise MtadError(f"NVML unavailable: no GPU {gpu!r}: {_err(e)}") from e
        self.label = f"{gpu}"
        self.info: dict[str, Any] = {"gpu": gpu}
        for key, fn in (("name", "nvmlDeviceGetName"), ("power_limit_mw", "nvmlDeviceGetEnforcedPowerLimit")):
            try:
                self.info[key] = getattr(self.nvml, fn)(self.handle)
            except Exception:
                pass
        try:
            self.info["driver"] = self.nvml.nvmlSystemGetDriverVersion()
        except Exception:
            pass
        if "name" in self.info:
            self.label = f"{gpu} ({self.info['name']})"

    def energy_mj(self) -> int:
        return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    def power_w(self) -> float:
        return self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0

    def clocks(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key, const in (("sm_mhz", "NVML_CLOCK_SM"), ("mem_mhz", "NVML_CLOCK_MEM")):
            try:
                out[key] = int(self.nvml.nvmlDeviceGetClockInfo(self.handle, getattr(self.nvml, const)))
            except Exception:
                pass
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass


class NvmlEnergyMeter(_WindowMeter):
    """GPU energy from NVML's total-energy counter, read at the window edges after sync().

    The counter (mJ since driver load) integrates power in hardware/firmware, so no sampling
    error; resolution is its update period (tens of ms), negligible for benchmark windows. The
    counter cannot give a peak, so `peak_hz` (default 10 Hz) also samples
    `nvmlDeviceGetPowerUsage` for `peak_w` (None when that call is unsupported or peak_hz=None).
    """

    name = "nvml"

    def __init__(
        self,
        gpu: int | str = 0,
        *,
        sync: Callable[[], Any] | None = None,
        peak_hz: float | None = 10.0,
        nvml: Any | None = None,
        clock: Clock = time.perf_counter,
    ) -> None:
        super().__init__(sync, clock)
        self._dev = _NvmlDevice(gpu, nvml)
        try:
            self._dev.energy_mj()
        except Exception as e:
            self._dev.close()
            raise MtadError(
                f"NVML energy counter unavailable on GPU {self._dev.label}: {_err(e)} "
                "(nvmlDeviceGetTotalEnergyConsumption needs Volta or newer)"
            ) from e
        self._peak: _Sampler | None = None
        peak_text = "no peak"
        if peak_hz:
            try:
                self._dev.power_w()
                self._peak = _Sampler(lambda: {"total": self._dev.power_w()}, peak_hz, clock)
                peak_text = f"peak W from nvmlDeviceGetPowerUsage sampled at {peak_hz:g} Hz"
            except Exception as e:
                peak_text = f"no peak (nvmlDeviceGetPowerUsage: {_err(e)})"
        self.method = (
            f"NVML total-energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ) on GPU "
            f"{self._dev.label}, read at window edges after device sync; {peak_text}"
        )
        self._e0 = 0
        self._clocks0: dict[str, int] = {}

    def _begin(self, t0: float) -> None:  # noqa: B027 - optional hook, no-op by default
        try:
            self._e0 = self._dev.energy_mj()
        except Exception as e:
            raise MtadError(f"NVML energy counter read failed: {_err(e)}") from e
        self._clocks0 = self._dev.clocks()
        if self._peak is not None:
            self._peak.begin()

    def _end(self) -> None:  # noqa: B027 - optional hook
        if self._peak is not None:
            self._peak.end()

    def _reading(self, t0: float, t: float, final: bool) -> EnergyReading:
        try:
            e1 = self._dev.energy_mj()
        except Exception as e:
            raise MtadError(f"NVML energy counter read failed: {_err(e)}") from e
        if e1 < self._e0:
            raise MtadError("NVML energy counter went backwards (driver reloaded during the window?)")
        joules = (e1 - self._e0) / 1000.0
        details: dict[str, Any] = dict(self._dev.info)
        details.update(counter_start_mj=self._e0, counter_end_mj=e1, clocks_start=self._clocks0)
        details["clocks_end"] = self._dev.clocks()
        peak = None
        if self._peak is not None:
            if final:
                self._peak.end()
            try:
                self._peak.sample()
            except Exception:
                pass
            samples = self._peak.snapshot()
            if samples:
                peak = max(s[1]["total"] for s in samples)
                details["peak_sampling"] = _sampling_details(samples, self._peak)
        seconds = t - t0
        return EnergyReading(joules, seconds, _avg(joules, seconds), peak, self.method, details)

    def _release(self) -> None:  # noqa: B027 - optional hook
        self._dev.close()


class NvmlPowerMeter(PowerSamplingMeter):
    """GPU power from `nvmlDeviceGetPowerUsage` sampled at `hz` (>= 10 Hz) and integrated.

    The fallback where the energy counter is NotSupported. On Ampere (except GA100) and newer,
    NVML documents this value as a 1 s average, so windows shorter than a few seconds are
    smoothed; prefer the counter where it exists.
    """

    name = "nvml-power"

    def __init__(
        self,
        gpu: int | str = 0,
        *,
        hz: float = 20.0,
        sync: Callable[[], Any] | None = None,
        nvml: Any | None = None,
        clock: Clock = time.perf_counter,
    ) -> None:
        dev = _NvmlDevice(gpu, nvml)
        try:
            dev.power_w()
        except Exception as e:
            dev.close()
            raise MtadError(f"NVML power reading unavailable on GPU {dev.label}: {_err(e)}") from e
        self._dev = dev
        super().__init__(
            dev.power_w,
            hz=hz,
            sync=sync,
            clock=clock,
            details=dev.info,
            method=(
                f"NVML power (nvmlDeviceGetPowerUsage) on GPU {dev.label} sampled at {hz:g} Hz in a "
                "background thread, trapezoid-integrated (energy counter not supported)"
            ),
        )

    def _extra_details(self, final: bool) -> dict[str, Any]:
        return {"clocks_end": self._dev.clocks()}

    def _release(self) -> None:  # noqa: B027 - optional hook
        self._dev.close()


def open_nvml_meter(
    gpu: int | str = 0,
    *,
    sync: Callable[[], Any] | None = None,
    hz: float = 20.0,
    nvml: Any | None = None,
    clock: Clock = time.perf_counter,
) -> EnergyMeter:
    """The energy counter if supported, else power sampling; MtadError with both reasons if neither."""
    try:
        return NvmlEnergyMeter(gpu, sync=sync, nvml=nvml, clock=clock)
    except MtadError as counter_err:
        if str(counter_err).startswith("NVML unavailable"):
            raise
        try:
            return NvmlPowerMeter(gpu, hz=hz, sync=sync, nvml=nvml, clock=clock)
        except MtadError as power_err:
            raise MtadError(f"{counter_err}; {power_err}") from power_err


# --------------------------------------------------------------------------------------------
# Jetson: INA3221 via sysfs, nvpmodel, clocks
# --------------------------------------------------------------------------------------------


def _read_int(path: Path | str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def _read_text(path: Path | str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class JetsonRail:
    """One INA3221 channel. Power from `power_path` (× power_scale_w) or mV × mA."""

    label: str
    power_path: Path | None = None
    voltage_path: Path | None = None  # mV
    current_path: Path | None = None  # mA
    power_scale_w: float = 1e-6  # hwmon power*_input is µW; the L4T-32 iio in_power*_input is mW

    def read_w(self) -> float:
        if self.power_path is not None:
            return _read_int(self.power_path) * self.power_scale_w
        assert self.voltage_path is not None and self.current_path is not None
        return _read_int(self.voltage_path) * _read_int(self.current_path) / 1e6


def _usable_label(label: str | None) -> bool:
    if not label:
        return False
    low = label.lower()
    return low not in ("nc", "n/a") and not low.startswith("sum of")


def find_jetson_rails(root: str | Path = "/") -> list[JetsonRail]:
    """INA3221 rails under `root`: the hwmon layout (L4T 34+: Orin, Xavier on JetPack 5/6) and
    the older iio layout (L4T 32: Nano, TX2, Xavier). Unlabelled / "NC" / sum channels are
    skipped; duplicate labels across chips get a "#2" suffix.
    """
    root = str(root)
    rails: list[JetsonRail] = []
    seen: dict[str, int] = {}

    def add(rail: JetsonRail) -> None:
        n = seen.get(rail.label, 0) + 1
        seen[rail.label] = n
        if n > 1:
            rail = JetsonRail(
                f"{rail.label}#{n}", rail.power_path, rail.voltage_path, rail.current_path, rail.power_scale_w
            )
        rails.append(rail)

    hw = os.path.join(root, "sys/bus/i2c/drivers/ina3221*/*/hwmon/hwmon*/in*_label")
    for label_file in sorted(glob.glob(hw)):
        m = re.fullmatch(r"in(\d+)_label", os.path.basename(label_file))
        if not m:
            continue
        n, d = m.group(1), Path(label_file).parent
        label = _read_text(label_file)
        if not _usable_label(label):
            continue
        assert label is not None
        power, volt, curr = d / f"power{n}_input", d / f"in{n}_input", d / f"curr{n}_input"
        if power.exists():
            add(JetsonRail(label, power_path=power, power_scale_w=1e-6))
        elif volt.exists() and curr.exists():
            add(JetsonRail(label, voltage_path=volt, current_path=curr))

    iio = os.path.join(root, "sys/bus/i2c/drivers/ina3221x/*/iio:device*/rail_name_*")
    for name_file in sorted(glob.glob(iio)):
        m = re.fullmatch(r"rail_name_(\d+)", os.path.basename(name_file))
        if not m:
            continue
        n, d = m.group(1), Path(name_file).parent
        label = _read_text(name_file)
        if not _usable_label(label):
            continue
        assert label is not None
        power, volt, curr = d / f"in_power{n}_input", d / f"in_voltage{n}_input", d / f"in_current{n}_input"
        if power.exists():
            add(JetsonRail(label, power_path=power, power_scale_w=1e-3))
        elif volt.exists() and curr.exists():
            add(JetsonRail(label, voltage_path=volt, current_path=curr))
    return rails


def _total_rule(labels: Sequence[str], total: str) -> tuple[Callable[[Mapping[str, float]], float], str]:
    """How a sample of rails becomes the module's power: one input rail, or the sum of all."""
    if total == "sum":
        return (lambda ch: sum(ch.values())), f"sum of rails {', '.join(labels)}"
    if total == "auto":
        for name in TOTAL_INPUT_RAILS:
            if name in labels:
                return (lambda ch, n=name: ch[n]), f"input rail {name} (others are parts of it)"
        return (lambda ch: sum(ch.values())), (
            f"sum of rails {', '.join(labels)} (no module-input rail such as VDD_IN)"
        )
    if total not in labels:
        raise MtadError(f"rail {total!r} not found; rails: {', '.join(labels)}")
    return (lambda ch: ch[total]), f"rail {total}"


def parse_nvpmodel(text: str) -> dict[str, Any]:
    """Parse `nvpmodel -q` output ("NV Power Mode: 25W" then the mode id on the next line)."""
    out: dict[str, Any] = {}
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        m = re.match(r"NV Power Mode\s*:\s*(.+)", ln)
        if m:
            out["name"] = m.group(1).strip()
            if i + 1 < len(lines) and lines[i + 1].isdigit():
                out["id"] = int(lines[i + 1])
            break
    return out


def read_nvpmodel(timeout_s: float = 5.0) -> dict[str, Any] | None:
    """The Jetson power mode from `nvpmodel -q`, or None where nvpmodel is absent or fails."""
    exe = shutil.which("nvpmodel")
    if exe is None:
        return None
    try:
        cp = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    parsed = parse_nvpmodel(cp.stdout)
    return parsed or None


def read_clocks(root: str | Path = "/") -> dict[str, int]:
    """Clocks worth recording next to an energy number: devfreq devices (Jetson GPU, EMC) in Hz,
    CPU cores' current frequency in kHz, and the BPMP EMC rate in Hz where readable (root only).
    Missing files are skipped, so this is safe on any Linux box.
    """
    root = str(root)
    clocks: dict[str, int] = {}
    for f in sorted(glob.glob(os.path.join(root, "sys/class/devfreq/*/cur_freq"))):
        txt = _read_text(f)
        if txt and txt.isdigit():
            clocks[f"devfreq:{os.path.basename(os.path.dirname(f))}_hz"] = int(txt)
    for f in sorted(
        glob.glob(os.path.join(root, "sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"))
    ):
        txt = _read_text(f)
        if txt and txt.isdigit():
            cpu = os.path.basename(os.path.dirname(os.path.dirname(f)))
            clocks[f"{cpu}_khz"] = int(txt)
    txt = _read_text(os.path.join(root, "sys/kernel/debug/bpmp/debug/clk/emc/rate"))
    if txt and txt.isdigit():
        clocks["emc_hz"] = int(txt)
    return clocks


class JetsonMeter(PowerSamplingMeter):
    """Jetson module power from the INA3221 rails in sysfs, sampled in a thread and integrated.

    `total="auto"` uses the module-input rail (VDD_IN / POM_5V_IN) where it exists and the sum
    of rails otherwise (AGX Orin/Xavier); "sum" or a rail name forces a choice. Per-rail joules
    are in `details["channels_j"]`. The power mode (`nvpmodel -q`) and clocks at the window
    edges are recorded because they dominate Jetson results. `root` is the filesystem root to
    look under (a fake tree in tests).
    """

    name = "jetson"

    def __init__(
        self,
        root: str | Path = "/",
        *,
        hz: float = 20.0,
        total: str = "auto",
        sync: Callable[[], Any] | None = None,
        record_power_mode: bool = True,
        clock: Clock = time.perf_counter,
    ) -> None:
        self._root = str(root)
        found = find_jetson_rails(root)
        if not found:
            raise MtadError(
                f"Jetson INA3221 rails not found under {os.path.join(self._root, 'sys/bus/i2c/drivers/ina3221*')}"
            )
        rails, unreadable = [], []
        for r in found:
            try:
                r.read_w()
                rails.append(r)
            except (OSError, ValueError) as e:
                unreadable.append(f"{r.label}: {_err(e)}")
        if not rails:
            raise MtadError(f"Jetson INA3221 rails are not readable: {'; '.join(unreadable)}")
        self.rails = rails
        labels = [r.label for r in rails]
        total_fn, total_desc = _total_rule(labels, total)
        details: dict[str, Any] = {"rails": labels, "total": total_desc}
        if unreadable:
            details["unreadable_rails"] = unreadable
        if record_power_mode:
            details["power_mode"] = read_nvpmodel()
        super().__init__(
            lambda: {r.label: r.read_w() for r in self.rails},
            hz=hz,
            total=total_fn,
            sync=sync,
            clock=clock,
            details=details,
            method=(
                f"Jetson INA3221 sysfs rails sampled at {hz:g} Hz in a background thread, "
                f"trapezoid-integrated; total = {total_desc}"
            ),
        )
        self._clocks0: dict[str, int] = {}

    def _begin(self, t0: float) -> None:  # noqa: B027 - optional hook, no-op by default
        super()._begin(t0)  # first sample right at the window start; clocks after it
        self._clocks0 = read_clocks(self._root)

    def _extra_details(self, final: bool) -> dict[str, Any]:
        return {"clocks_start": self._clocks0, "clocks_end": read_clocks(self._root)}


# --------------------------------------------------------------------------------------------
# tegrastats
# --------------------------------------------------------------------------------------------

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


class TegrastatsMeter(_WindowMeter):
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
            raise MtadError(f"tegrastats unavailable: could not start {command[0]}: {_err(e)}") from e
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
            self._total_fn, total_desc = _total_rule(labels, total)
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
        return EnergyReading(joules, seconds, _avg(joules, seconds), max(watts), self.method, details)

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


# --------------------------------------------------------------------------------------------
# RAPL (Linux powercap)
# --------------------------------------------------------------------------------------------


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
        return _read_int(self.path / "energy_uj")


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
        name = _read_text(os.path.join(d, "name"))
        rng = _read_text(os.path.join(d, "max_energy_range_uj"))
        if name is None or not os.path.exists(os.path.join(d, "energy_uj")):
            continue
        zones.append(RaplZone(name, Path(d), int(rng) if rng and rng.isdigit() else 0))
    if which == "all":
        return zones
    picked = [z for z in zones if z.name.startswith("package") or z.name == "dram"]
    if not picked:
        picked = [z for z in zones if z.name == "psys"]
    return picked


class RaplMeter(_WindowMeter):
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
                raise MtadError(f"RAPL unavailable: reading {z.path / 'energy_uj'} failed: {_err(e)}") from e
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
                raise MtadError(f"RAPL read failed: {_err(e)}") from e
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
            raise MtadError(f"RAPL read failed: {_err(e)}") from e
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
        return EnergyReading(joules, seconds, _avg(joules, seconds), peak, self.method, details)


# --------------------------------------------------------------------------------------------
# No meter
# --------------------------------------------------------------------------------------------


class NullMeter(_WindowMeter):
    """Measures time only; every reading says plainly why there is no energy."""

    name = "none"

    def __init__(self, reason: str, clock: Clock = time.perf_counter) -> None:
        super().__init__(None, clock)
        self.reason = reason
        self.method = f"unavailable: {reason}"

    def _reading(self, t0: float, t: float, final: bool) -> EnergyReading:
        return EnergyReading(None, t - t0, None, None, self.method, {"reason": self.reason})


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def open_meter(
    kind: str = "auto",
    *,
    device: str = "cuda",
    gpu: int | str = 0,
    sync: Callable[[], Any] | None = None,
    hz: float = 20.0,
    root: str | Path = "/",
    tegrastats_interval_ms: int = 100,
    nvml: Any | None = None,
) -> EnergyMeter:
    """Open the best available meter, or the one `kind` names.

    kind: "auto" | "nvml" | "jetson" | "tegrastats" | "rapl" | "none". A named kind that cannot
    work raises MtadError saying why. "auto" tries, for device "cuda" (the default): NVML
    (counter, else power sampling), Jetson sysfs rails, tegrastats, RAPL; for device "cpu":
    RAPL, Jetson rails, tegrastats (a Jetson's module rails include the CPU). If nothing works
    it returns a NullMeter whose method lists every reason. `root` is the filesystem root for
    sysfs lookups, `nvml` a stand-in for the pynvml module (tests).
    """
    k = kind.lower()
    if k not in KINDS:
        raise MtadError(f"unknown energy meter {kind!r}; choose one of {', '.join(KINDS)}")
    if k == "none":
        return NullMeter("energy measurement turned off (kind='none')")
    openers: dict[str, Callable[[], EnergyMeter]] = {
        "nvml": lambda: open_nvml_meter(gpu, sync=sync, hz=hz, nvml=nvml),
        "jetson": lambda: JetsonMeter(root, hz=hz, sync=sync),
        "tegrastats": lambda: TegrastatsMeter(tegrastats_interval_ms, sync=sync, root=root),
        "rapl": lambda: RaplMeter(root, sync=sync),
    }
    if k != "auto":
        return openers[k]()
    if device.lower().startswith("cpu"):
        order: tuple[str, ...] = ("rapl", "jetson", "tegrastats")
    else:
        order = ("nvml", "jetson", "tegrastats", "rapl")
    reasons = []
    for name in order:
        try:
            return openers[name]()
        except (MtadError, OSError, ValueError) as e:
            reasons.append(f"{name}: {re.sub(r'^[A-Za-z]+ unavailable: ', '', _err(e))}")
    return NullMeter("; ".join(reasons))
