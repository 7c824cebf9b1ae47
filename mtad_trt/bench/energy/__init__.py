"""Energy meters behind one small interface: NVML, Jetson INA3221, tegrastats, RAPL, or none.

Why this exists: the MTAD paper's energy numbers come from polling `nvidia-smi` at about 1 Hz
and summing every GPU on the node (docs/algorithm.md §6.1, §7 item 6). Here each meter measures one
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

- `nvml.NvmlEnergyMeter`: the total-energy counter (`nvmlDeviceGetTotalEnergyConsumption`, mJ
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

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtad_trt.bench.energy.base import (
    EnergyMeter,
    EnergyReading,
    Measurement,
    NullMeter,
    PowerSamplingMeter,
    describe_error,
    integrate_trapezoid,
    measure,
)
from mtad_trt.bench.energy.jetson import (
    JetsonMeter,
    JetsonRail,
    find_jetson_rails,
    parse_nvpmodel,
    read_clocks,
    read_nvpmodel,
)
from mtad_trt.bench.energy.nvml import NvmlEnergyMeter, NvmlPowerMeter, open_nvml_meter
from mtad_trt.bench.energy.rapl import RaplMeter, RaplZone, find_rapl_zones, rapl_delta_uj
from mtad_trt.bench.energy.tegrastats import TegrastatsMeter, TegrastatsSample, parse_tegrastats_line
from mtad_trt.bench.metrics import decode_joules_per_token, joules_per_token, tokens_per_joule
from mtad_trt.errors import MtadError

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

# Selection


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
            reasons.append(f"{name}: {re.sub(r'^[A-Za-z]+ unavailable: ', '', describe_error(e))}")
    return NullMeter("; ".join(reasons))

