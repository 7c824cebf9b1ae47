"""Jetson: the INA3221 power rails in sysfs (NVML power calls return NotSupported there), with the
nvpmodel power mode and clocks recorded beside the energy, since they dominate results."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtad_trt.bench.energy.base import Clock, PowerSamplingMeter, describe_error, read_int, read_text
from mtad_trt.errors import MtadError

# Rails that measure the whole module's input; when present they are the total (the others are
# parts of it, so summing would double count). Without one (AGX Orin, AGX Xavier) we sum rails.
TOTAL_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


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
            return read_int(self.power_path) * self.power_scale_w
        assert self.voltage_path is not None and self.current_path is not None
        return read_int(self.voltage_path) * read_int(self.current_path) / 1e6


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
        label = read_text(label_file)
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
        label = read_text(name_file)
        if not _usable_label(label):
            continue
        assert label is not None
        power, volt, curr = d / f"in_power{n}_input", d / f"in_voltage{n}_input", d / f"in_current{n}_input"
        if power.exists():
            add(JetsonRail(label, power_path=power, power_scale_w=1e-3))
        elif volt.exists() and curr.exists():
            add(JetsonRail(label, voltage_path=volt, current_path=curr))
    return rails


def total_rule(labels: Sequence[str], total: str) -> tuple[Callable[[Mapping[str, float]], float], str]:
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
        txt = read_text(f)
        if txt and txt.isdigit():
            clocks[f"devfreq:{os.path.basename(os.path.dirname(f))}_hz"] = int(txt)
    for f in sorted(
        glob.glob(os.path.join(root, "sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"))
    ):
        txt = read_text(f)
        if txt and txt.isdigit():
            cpu = os.path.basename(os.path.dirname(os.path.dirname(f)))
            clocks[f"{cpu}_khz"] = int(txt)
    txt = read_text(os.path.join(root, "sys/kernel/debug/bpmp/debug/clk/emc/rate"))
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
                unreadable.append(f"{r.label}: {describe_error(e)}")
        if not rails:
            raise MtadError(f"Jetson INA3221 rails are not readable: {'; '.join(unreadable)}")
        self.rails = rails
        labels = [r.label for r in rails]
        total_fn, total_desc = total_rule(labels, total)
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


