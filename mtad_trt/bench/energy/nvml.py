"""NVIDIA datacenter GPUs: NVML's total-energy counter at the window edges, or power sampling where
the counter is NotSupported. pynvml (nvidia-ml-py) is imported only when a meter opens."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mtad_trt.bench.energy.base import (
    Clock,
    EnergyMeter,
    EnergyReading,
    PowerSamplingMeter,
    Sampler,
    WindowMeter,
    average_watts,
    describe_error,
    sampling_details,
)
from mtad_trt.errors import MtadError


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


class _NvmlDevice:
    """nvmlInit + one device handle. NVML reference-counts init/shutdown, so each meter pairs them."""

    def __init__(self, gpu: int | str, nvml: Any | None) -> None:
        self.nvml = _import_nvml(nvml)
        try:
            self.nvml.nvmlInit()
        except Exception as e:
            raise MtadError(f"NVML unavailable: nvmlInit failed: {describe_error(e)}") from e
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
            raise MtadError(f"NVML unavailable: no GPU {gpu!r}: {describe_error(e)}") from e
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


class NvmlEnergyMeter(WindowMeter):
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
                f"NVML energy counter unavailable on GPU {self._dev.label}: {describe_error(e)} "
                "(nvmlDeviceGetTotalEnergyConsumption needs Volta or newer)"
            ) from e
        self._peak: Sampler | None = None
        peak_text = "no peak"
        if peak_hz:
            try:
                self._dev.power_w()
                self._peak = Sampler(lambda: {"total": self._dev.power_w()}, peak_hz, clock)
                peak_text = f"peak W from nvmlDeviceGetPowerUsage sampled at {peak_hz:g} Hz"
            except Exception as e:
                peak_text = f"no peak (nvmlDeviceGetPowerUsage: {describe_error(e)})"
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
            raise MtadError(f"NVML energy counter read failed: {describe_error(e)}") from e
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
            raise MtadError(f"NVML energy counter read failed: {describe_error(e)}") from e
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
                details["peak_sampling"] = sampling_details(samples, self._peak)
        seconds = t - t0
        return EnergyReading(joules, seconds, average_watts(joules, seconds), peak, self.method, details)

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
            raise MtadError(f"NVML power reading unavailable on GPU {dev.label}: {describe_error(e)}") from e
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


