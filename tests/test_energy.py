"""Energy meters against fake sources: fake NVML module, fake sysfs trees, fake tegrastats."""

from __future__ import annotations

import math
import os
import stat
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mtad_trt.bench.energy import (
    EnergyMeter,
    EnergyReading,
    JetsonMeter,
    NullMeter,
    NvmlEnergyMeter,
    NvmlPowerMeter,
    PowerSamplingMeter,
    RaplMeter,
    RaplZone,
    TegrastatsMeter,
    find_jetson_rails,
    find_rapl_zones,
    integrate_trapezoid,
    joules_per_token,
    measure,
    open_meter,
    open_nvml_meter,
    parse_nvpmodel,
    parse_tegrastats_line,
    rapl_delta_uj,
    read_clocks,
    read_nvpmodel,
)
from mtad_trt.errors import MtadError

FIXTURES = Path(__file__).parent / "fixtures" / "energy"


def _write(path: Path, text: str | int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{text}\n")
    os.replace(tmp, path)  # atomic, so a polling thread never reads a half-written number
    return path


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---- helpers --------------------------------------------------------------------------------


def test_integrate_trapezoid_hand_value():
    # [0,1]: (10+20)/2 = 15 J; [1,3]: 2 s * 20 W = 40 J
    assert integrate_trapezoid([0.0, 1.0, 3.0], [10.0, 20.0, 20.0]) == 55.0
    assert integrate_trapezoid([1.0], [5.0]) == 0.0
    with pytest.raises(ValueError):
        integrate_trapezoid([0.0, 1.0], [1.0])


def test_reading_to_dict_and_joules_per_token():
    r = EnergyReading(12.0, 2.0, 6.0, 9.0, "test", {"a": 1})
    assert r.available and r.to_dict()["details"] == {"a": 1}
    assert joules_per_token(r, 24) == 0.5


# ---- power sampling (injected source) ----------------------------------------------------------


def test_power_sampling_integrates_linear_ramp_exactly():
    # P(t) = 10 + 100 t on a virtual clock that advances only while the source is read (10 ms a read,
    # the source answering for the middle of its read), so the thread's scheduling cannot move a sample
    # off its timestamp: the trapezoid rule is exact for a linear signal and the check can be tight.
    # (On perf_counter a sampler preempted mid-read on a loaded 2-core CI box missed rel=1e-3.)
    now = [0.0]

    def clock() -> float:
        return now[0]

    def power() -> float:
        now[0] += 0.010
        return 10.0 + 100.0 * (now[0] - 0.005)

    meter = PowerSamplingMeter(power, hz=50.0, clock=clock)
    assert isinstance(meter, EnergyMeter)
    meter.start()
    time.sleep(0.4)
    r = meter.stop()
    d = r.details
    kept = meter._sampler.snapshot()  # what the integral used (a late thread read is dropped)
    a, b = kept[0][0], kept[-1][0]
    analytic = 10.0 * (b - a) + 50.0 * (b * b - a * a)
    assert d["samples"] >= 10 and d["requested_hz"] == 50.0
    assert r.joules == pytest.approx(analytic, rel=1e-9)
    assert r.seconds == pytest.approx(b - a, abs=1e-9)
    assert r.peak_w == pytest.approx(10.0 + 100.0 * b, rel=1e-9)
    assert r.avg_w == pytest.approx(r.joules / r.seconds)


def test_power_sampling_achieves_its_rate_on_the_real_clock():
    meter = PowerSamplingMeter(lambda: 5.0, hz=50.0)
    meter.start()
    time.sleep(0.4)
    r = meter.stop()
    assert r.joules == pytest.approx(5.0 * r.seconds, rel=1e-9)
    assert r.details["achieved_hz"] > 10.0


def test_power_sampling_sine_against_analytic_integral():
    # P(t) = 100 + 50 sin(2π t / 0.25 s), sampled at 100 Hz: trapezoid error is far below 1 %.
    t_base = time.perf_counter()
    w = 2 * math.pi / 0.25

    def power() -> float:
        return 100.0 + 50.0 * math.sin(w * (time.perf_counter() - t_base))

    meter = PowerSamplingMeter(power, hz=100.0)
    meter.start()
    time.sleep(0.6)
    r = meter.stop()
    a, b = meter._sampler.samples[0][0] - t_base, meter._sampler.samples[-1][0] - t_base
    analytic = 100.0 * (b - a) - 50.0 / w * (math.cos(w * b) - math.cos(w * a))
    assert r.joules == pytest.approx(analytic, rel=0.01)
    assert r.peak_w is not None and 140.0 < r.peak_w <= 150.0


def test_power_sampling_channels_read_and_total():
    meter = PowerSamplingMeter(
        lambda: {"VDD_IN": 5.0, "VDD_SOC": 1.0}, hz=50.0, total=lambda ch: ch["VDD_IN"], name="rails"
    )
    with meter:
        meter.start()
        time.sleep(0.1)
        mid = meter.read()
        time.sleep(0.1)
        r = meter.stop()
    assert mid.joules is not None and r.joules is not None
    assert 0 < mid.joules < r.joules
    assert r.joules == pytest.approx(5.0 * r.seconds, rel=0.02)
    assert r.details["channels_j"]["VDD_SOC"] == pytest.approx(r.joules / 5.0, rel=1e-9)
    assert r.peak_w == 5.0


def test_power_sampling_start_failure_is_a_user_error():
    def broken() -> float:
        raise OSError("sensor gone")

    meter = PowerSamplingMeter(broken, hz=10.0)
    with pytest.raises(MtadError, match="sensor gone"):
        meter.start()
    with pytest.raises(MtadError):
        PowerSamplingMeter(lambda: 1.0, hz=0)


def test_meter_misuse_is_reported():
    meter = NullMeter("test")
    with pytest.raises(MtadError, match="start"):
        meter.stop()
    meter.start()
    with pytest.raises(MtadError, match="twice"):
        meter.start()
    meter.stop()
    meter.close()
    with pytest.raises(MtadError, match="closed"):
        meter.start()


# ---- NVML (fake module) ---------------------------------------------------------------------


class FakeNvml:
    """The pynvml calls the meters use, with switchable support."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        def __str__(self) -> str:
            return "Not Supported"

    class NVMLError_LibraryNotFound(NVMLError):
        def __str__(self) -> str:
            return "NVML Shared Library Not Found"

    NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2

    def __init__(self, *, library=True, counter=True, power=True) -> None:
        self.library, self.counter, self.power = library, counter, power
        self.energy_mj = 1_000_000
        self.power_mw = 150_000
        self.inits = self.shutdowns = 0

    def nvmlInit(self):
        if not self.library:
            raise self.NVMLError_LibraryNotFound()
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("gpu", i)

    def nvmlDeviceGetName(self, h):
        return "Fake H100"

    def nvmlSystemGetDriverVersion(self):
        return "999.1"

    def nvmlDeviceGetClockInfo(self, h, which):
        return 1980 if which == self.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.counter:
            raise self.NVMLError_NotSupported()
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, h):
        if not self.power:
            raise self.NVMLError_NotSupported()
        return self.power_mw


def test_nvml_counter_is_read_at_window_edges_after_sync():
    nvml, clock, syncs = FakeNvml(), FakeClock(), []
    meter = NvmlEnergyMeter(0, sync=lambda: syncs.append(clock.t), peak_hz=None, nvml=nvml, clock=clock)
    meter.start()
    nvml.energy_mj += 5_000  # 5 J over 2 s
    clock.t += 2.0
    r = meter.stop()
    assert (r.joules, r.seconds, r.avg_w, r.peak_w) == (5.0, 2.0, 2.5, None)
    assert len(syncs) == 2
    assert "nvmlDeviceGetTotalEnergyConsumption" in r.method and "Fake H100" in r.method
    assert r.details["clocks_start"] == {"sm_mhz": 1980, "mem_mhz": 2619}
    meter.close()
    assert nvml.inits == nvml.shutdowns == 1


def test_nvml_counter_with_peak_sampling():
    nvml = FakeNvml()
    with NvmlEnergyMeter(0, nvml=nvml, peak_hz=50.0) as meter, measure(meter) as m:
        time.sleep(0.05)
    assert m.reading is not None and m.reading.peak_w == 150.0
    assert "sampled at 50 Hz" in m.reading.method


def test_nvml_falls_back_to_power_sampling_when_counter_not_supported():
    nvml = FakeNvml(counter=False)
    meter = open_nvml_meter(0, nvml=nvml, hz=50.0)
    assert isinstance(meter, NvmlPowerMeter)
    assert "nvmlDeviceGetPowerUsage" in meter.method and "50 Hz" in meter.method
    meter.start()
    time.sleep(0.2)
    r = meter.stop()
    meter.close()
    assert r.joules == pytest.approx(150.0 * r.seconds, rel=0.02)
    assert r.peak_w == 150.0
    assert nvml.inits == nvml.shutdowns  # the failed counter attempt released its init too


def test_nvml_neither_counter_nor_power_gives_both_reasons():
    with pytest.raises(MtadError, match="energy counter unavailable.*power reading unavailable"):
        open_nvml_meter(0, nvml=FakeNvml(counter=False, power=False))


def test_nvml_library_missing_auto_falls_through_to_null_meter(tmp_path):
    meter = open_meter("auto", root=tmp_path, nvml=FakeNvml(library=False))
    assert isinstance(meter, NullMeter)
    assert meter.method.startswith("unavailable: ")
    assert "nvml: nvmlInit failed: NVML Shared Library Not Found" in meter.method
    assert "jetson:" in meter.method and "rapl:" in meter.method
    meter.start()
    r = meter.stop()
    assert r.joules is None and r.avg_w is None and r.peak_w is None and not r.available
    assert r.method == meter.method and r.seconds >= 0
    assert joules_per_token(r, 10) is None


def test_forcing_an_unavailable_meter_raises_with_reason(tmp_path):
    with pytest.raises(MtadError, match="NVML Shared Library Not Found"):
        open_meter("nvml", nvml=FakeNvml(library=False))
    with pytest.raises(MtadError, match="INA3221"):
        open_meter("jetson", root=tmp_path)
    with pytest.raises(MtadError, match="RAPL unavailable"):
        open_meter("rapl", root=tmp_path)
    with pytest.raises(MtadError, match="unknown energy meter"):
        open_meter("smi")
    assert isinstance(open_meter("none"), NullMeter)


def test_real_pynvml_never_raises_anything_but_mtad_error():
    # Here (no driver) nvmlInit raises NVMLError_LibraryNotFound; on a GPU box this opens a meter.
    try:
        meter = open_meter("nvml")
    except MtadError as e:
        assert "NVML" in str(e)
    else:
        meter.close()


# ---- Jetson sysfs ---------------------------------------------------------------------------


def _orin_nano_tree(root: Path) -> None:
    """INA3221 hwmon layout as on an Orin Nano (L4T 35/36), plus clocks."""
    d = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    rails = {1: ("VDD_IN", 5000, 1000), 2: ("VDD_CPU_GPU_CV", 5000, 300), 3: ("VDD_SOC", 5000, 200)}
    for n, (label, mv, ma) in rails.items():
        _write(d / f"in{n}_label", label)
        _write(d / f"in{n}_input", mv)
        _write(d / f"curr{n}_input", ma)
    _write(d / "in7_label", "sum of shunt voltages")  # not a rail
    _write(d / "in7_input", 40)
    _write(root / "sys/class/devfreq/17000000.ga10b/cur_freq", 306000000)
    _write(root / "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq", 729600)


def test_find_jetson_rails_hwmon_and_iio(tmp_path):
    _orin_nano_tree(tmp_path)
    rails = find_jetson_rails(tmp_path)
    assert [r.label for r in rails] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    assert [r.read_w() for r in rails] == pytest.approx([5.0, 1.5, 1.0])  # mV * mA / 1e6

    old = tmp_path / "old"  # L4T 32 (Nano): iio device with in_power*_input in mW
    d = old / "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    for n, (label, mw) in enumerate([("POM_5V_IN", 3000), ("POM_5V_GPU", 0), ("POM_5V_CPU", 644)]):
        _write(d / f"rail_name_{n}", label)
        _write(d / f"in_power{n}_input", mw)
    rails = find_jetson_rails(old)
    assert {r.label: r.read_w() for r in rails} == pytest.approx(
        {"POM_5V_IN": 3.0, "POM_5V_GPU": 0.0, "POM_5V_CPU": 0.644}
    )

    hw_power = tmp_path / "p" / "sys/bus/i2c/drivers/ina3221/1-0041/hwmon/hwmon4"  # power*_input in µW
    _write(hw_power / "in1_label", "VDD_GPU_SOC")
    _write(hw_power / "power1_input", 2_363_000)
    assert find_jetson_rails(tmp_path / "p")[0].read_w() == pytest.approx(2.363)


def test_jetson_meter_integrates_module_input_rail(tmp_path):
    _orin_nano_tree(tmp_path)
    with JetsonMeter(tmp_path, hz=50.0, record_power_mode=False) as meter:
        assert "VDD_IN" in meter.method and "50 Hz" in meter.method
        meter.start()
        time.sleep(0.2)
        r = meter.stop()
    # VDD_IN is the module input; the other rails are parts of it and must not be added
    assert r.joules == pytest.approx(5.0 * r.seconds, rel=0.02)
    assert r.peak_w == pytest.approx(5.0)
    assert r.details["channels_j"]["VDD_SOC"] == pytest.approx(r.joules / 5.0, rel=1e-6)
    assert r.details["clocks_start"]["devfreq:17000000.ga10b_hz"] == 306000000
    assert r.details["clocks_end"]["cpu0_khz"] == 729600


def test_jetson_meter_sums_rails_without_input_rail_and_honours_override(tmp_path):
    d = tmp_path / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon2"
    for n, (label, uw) in enumerate([("VDD_GPU_SOC", 2_000_000), ("VDD_CPU_CV", 500_000)], start=1):
        _write(d / f"in{n}_label", label)
        _write(d / f"power{n}_input", uw)
    with JetsonMeter(tmp_path, hz=50.0, record_power_mode=False) as meter:
        assert "sum of rails" in meter.method
        meter.start()
        time.sleep(0.1)
        r = meter.stop()
    assert r.avg_w == pytest.approx(2.5, rel=0.02)
    with JetsonMeter(tmp_path, hz=50.0, total="VDD_CPU_CV", record_power_mode=False) as meter:
        with measure(meter) as m:
            time.sleep(0.05)
    assert m.reading is not None and m.reading.peak_w == pytest.approx(0.5)
    with pytest.raises(MtadError, match="not found"):
        JetsonMeter(tmp_path, total="VDD_IN", record_power_mode=False)


def test_auto_picks_jetson_when_nvml_is_missing(tmp_path):
    _orin_nano_tree(tmp_path)
    meter = open_meter("auto", root=tmp_path, nvml=FakeNvml(library=False))
    try:
        assert isinstance(meter, JetsonMeter)
    finally:
        meter.close()


def test_nvpmodel_parsing_and_command(tmp_path, monkeypatch):
    text = (FIXTURES / "nvpmodel_q.txt").read_text()
    assert parse_nvpmodel(text) == {"name": "15W", "id": 0}
    assert parse_nvpmodel("NV Power Mode: MAXN_SUPER\n2\n") == {"name": "MAXN_SUPER", "id": 2}
    assert parse_nvpmodel("garbage") == {}

    monkeypatch.setenv("PATH", str(tmp_path / "nobin"))
    assert read_nvpmodel() is None  # not a Jetson
    fixture = FIXTURES / "nvpmodel_q.txt"
    fake = _write(tmp_path / "bin" / "nvpmodel", f"#!{sys.executable}\nprint(open({str(fixture)!r}).read())")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert read_nvpmodel() == {"name": "15W", "id": 0}


def test_read_clocks_is_empty_on_an_empty_tree(tmp_path):
    assert read_clocks(tmp_path) == {}


# ---- tegrastats -----------------------------------------------------------------------------


def _lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text().splitlines()


def test_tegrastats_orin_nano_jp5():
    s = parse_tegrastats_line(_lines("tegrastats_orin_nano_jp5.txt")[0])
    assert s.rails_mw == {"VDD_IN": 9012, "VDD_CPU_GPU_CV": 3405, "VDD_SOC": 2150}
    assert s.rails_avg_mw == {"VDD_IN": 7011, "VDD_CPU_GPU_CV": 2103, "VDD_SOC": 1870}
    assert (s.ram_used_mb, s.ram_total_mb) == (1865, 7620)  # "RAM 1865/7620MB" is not a rail
    assert (s.gpu_util_pct, s.gpu_mhz, s.emc_util_pct, s.emc_mhz) == (62, 624, 3, 2133)
    assert s.cpu[:2] == ((9, 1510), (4, 1510)) and s.cpu[4] is None  # "off" cores
    assert s.timestamp is None


def test_tegrastats_orin_nano_jp6_with_timestamp():
    s = parse_tegrastats_line(_lines("tegrastats_orin_nano_jp6.txt")[1])
    assert s.timestamp == "11-28-2024 10:15:02"
    assert s.rails_mw == {"VDD_IN": 17652, "VDD_CPU_GPU_CV": 8021, "VDD_SOC": 3977}
    assert (s.gpu_util_pct, s.gpu_mhz) == (97, 1020)  # "GR3D_FREQ 97%@[1020]"
    first = parse_tegrastats_line(_lines("tegrastats_orin_nano_jp6.txt")[0])
    assert first.rails_avg_mw["VDD_CPU_GPU_CV"] == 1300


def test_tegrastats_agx_orin_has_no_input_rail():
    s = parse_tegrastats_line(_lines("tegrastats_agx_orin.txt")[1])
    assert s.rails_mw == {
        "VDD_GPU_SOC": 21340,
        "VDD_CPU_CV": 2770,
        "VIN_SYS_5V0": 4860,
        "VDDQ_VDD2_1V8AO": 1209,
    }
    assert (s.gpu_util_pct, s.gpu_mhz) == (88, 1300)  # "GR3D_FREQ 88%@[1300,1300]"


def test_tegrastats_l4t32_formats_without_units():
    nano = parse_tegrastats_line(_lines("tegrastats_nano_l4t32.txt")[1])
    assert nano.rails_mw == {"POM_5V_IN": 7205, "POM_5V_GPU": 3127, "POM_5V_CPU": 1441}
    assert nano.rails_avg_mw["POM_5V_IN"] == 5102  # "IRAM 0/252kB" and "SWAP 0/1978MB" are not rails
    nx = parse_tegrastats_line(_lines("tegrastats_xavier_nx_l4t32.txt")[0])
    assert nx.rails_mw == {"VDD_IN": 4216, "VDD_CPU_GPU_CV": 515, "VDD_SOC": 1237}
    assert (nx.gpu_util_pct, nx.gpu_mhz, nx.emc_mhz) == (0, None, None)
    agx = parse_tegrastats_line(_lines("tegrastats_agx_xavier_l4t32.txt")[0])
    assert agx.rails_mw == {"GPU": 0, "CPU": 308, "SOC": 1078, "CV": 0, "VDDRQ": 154, "SYS5V": 1560}
    assert len(agx.cpu) == 8


def test_tegrastats_line_without_rails():
    s = parse_tegrastats_line("RAM 1845/3956MB (lfb 4x2MB) SWAP 0/1978MB (cached 0MB) CPU [off,off]")
    assert s.rails_mw == {} and s.ram_used_mb == 1845


def _fake_tegrastats(tmp_path: Path, lines: list[str], period_s: float) -> list[str]:
    script = tmp_path / "fake_tegrastats.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import itertools, sys, time
            lines = {lines!r}
            for line in itertools.cycle(lines):
                print(line, flush=True)
                time.sleep({period_s})
            """
        )
    )
    return [sys.executable, str(script)]


def test_tegrastats_meter_integrates_constant_input_rail(tmp_path):
    line = "RAM 1865/7620MB (lfb 1187x4MB) GR3D_FREQ 50%@624 VDD_IN 5000mW/5000mW VDD_CPU_GPU_CV 2000mW/2000mW VDD_SOC 1000mW/1000mW"
    cmd = _fake_tegrastats(tmp_path, [line], 0.02)
    with TegrastatsMeter(20, command=cmd, record_power_mode=False, root=tmp_path) as meter:
        assert "input rail VDD_IN" in meter.method
        meter.start()
        time.sleep(0.3)
        r = meter.stop()
    assert r.joules == pytest.approx(5.0 * r.seconds, rel=1e-6)  # constant power, held at the edges
    assert r.peak_w == 5.0
    assert r.details["lines"] >= 5
    assert r.details["channels_j"]["VDD_SOC"] == pytest.approx(1.0 * r.seconds, rel=1e-6)
    assert r.details["gpu_util_pct_mean"] == 50


def test_tegrastats_meter_agx_orin_sums_rails(tmp_path):
    cmd = _fake_tegrastats(tmp_path, _lines("tegrastats_agx_orin.txt")[:1], 0.02)
    with TegrastatsMeter(20, command=cmd, record_power_mode=False, root=tmp_path) as meter:
        assert "sum of rails" in meter.method
        with measure(meter) as m:
            time.sleep(0.1)
    assert m.reading is not None
    assert m.reading.avg_w == pytest.approx(2.363 + 0.393 + 2.712 + 0.403, rel=1e-6)


def test_tegrastats_meter_without_rails_is_unavailable(tmp_path):
    cmd = _fake_tegrastats(tmp_path, ["RAM 1/2MB CPU [off]"], 0.02)
    with pytest.raises(MtadError, match="no power rails"):
        TegrastatsMeter(20, command=cmd, first_sample_timeout_s=0.5, record_power_mode=False)
    with pytest.raises(MtadError, match="could not start"):
        TegrastatsMeter(20, command=[str(tmp_path / "missing")], record_power_mode=False)


# ---- RAPL -----------------------------------------------------------------------------------

RANGE = 1_000_000  # a small max_energy_range_uj so the test can wrap the counter


def _rapl_tree(root: Path, package_uj: int, dram_uj: int) -> tuple[Path, Path]:
    base = root / "sys/class/powercap"
    zones = {
        "intel-rapl:0": ("package-0", package_uj),
        "intel-rapl:0:0": ("core", 5),  # inside the package: not added
        "intel-rapl:0:2": ("dram", dram_uj),
        "intel-rapl:1": ("psys", 7),  # overlaps everything: not added
    }
    for zone, (name, uj) in zones.items():
        _write(base / zone / "name", name)
        _write(base / zone / "energy_uj", uj)
        _write(base / zone / "max_energy_range_uj", RANGE)
    _write(base / "intel-rapl-mmio:0" / "name", "package-0")  # duplicate MMIO interface: ignored
    return base / "intel-rapl:0" / "energy_uj", base / "intel-rapl:0:2" / "energy_uj"


def test_rapl_delta_wraps_at_max_range():
    assert rapl_delta_uj(100, 350, RANGE) == 250
    assert rapl_delta_uj(999_000, 500, RANGE) == 1_500  # 999000 -> 1000000 -> 0 -> 500


def test_rapl_zone_selection(tmp_path):
    _rapl_tree(tmp_path, 0, 0)
    assert [z.name for z in find_rapl_zones(tmp_path)] == ["package-0", "dram"]
    assert len(find_rapl_zones(tmp_path, "all")) == 4


def test_rapl_wraparound_at_window_edges(tmp_path):
    pkg, dram = _rapl_tree(tmp_path, package_uj=999_000, dram_uj=10)
    clock = FakeClock()
    meter = RaplMeter(tmp_path, poll_hz=None, clock=clock)
    meter.start()
    _write(pkg, 500)  # wrapped: +1_500 µJ
    _write(dram, 2_010)  # +2_000 µJ
    clock.t += 0.5
    r = meter.stop()
    assert r.joules == pytest.approx(0.0035)
    assert r.seconds == 0.5 and r.avg_w == pytest.approx(0.007)
    assert r.details["wraps"] == 1
    assert r.details["zones_j"] == pytest.approx(
        {"package-0 (intel-rapl:0)": 0.0015, "dram (intel-rapl:0:2)": 0.002}
    )
    assert "CPU package/DRAM only" in r.method


def test_rapl_polling_catches_more_than_one_wrap(tmp_path):
    pkg, _ = _rapl_tree(tmp_path, package_uj=900_000, dram_uj=0)
    clock = FakeClock()
    meter = RaplMeter(tmp_path, poll_hz=None, clock=clock)
    meter.start()
    for value in (100_000, 950_000, 50_000):  # +200_000 (wrap), +850_000, +100_000 (wrap)
        _write(pkg, value)
        clock.t += 1.0
        meter.poll()
    r = meter.stop()
    # edge reads alone would see 900_000 -> 50_000 = one wrap = 150_000 µJ
    assert r.joules == pytest.approx(1.15)
    assert r.details["wraps"] == 2
    assert r.peak_w == pytest.approx(0.85)  # the largest per-poll power: 850_000 µJ in 1 s


def test_rapl_background_polling_with_a_moving_counter(tmp_path):
    pkg, _ = _rapl_tree(tmp_path, package_uj=0, dram_uj=0)
    meter = RaplMeter(tmp_path, poll_hz=50.0)
    meter.start()
    value = total = 0
    for _ in range(30):  # 30 x 50_000 µJ = 1.5 J, wrapping the 1 J counter
        value = (value + 50_000) % RANGE
        total += 50_000
        _write(pkg, value)
        time.sleep(0.01)
    r = meter.stop()
    meter.close()
    assert r.joules == pytest.approx(total / 1e6)
    assert r.details["wraps"] >= 1
    assert r.peak_w is not None and r.peak_w > 0


def test_rapl_unreadable_counter_explains_permissions(tmp_path, monkeypatch):
    _rapl_tree(tmp_path, 0, 0)

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(RaplZone, "read_uj", denied)
    with pytest.raises(MtadError, match="root-only"):
        RaplMeter(tmp_path)


def test_auto_for_cpu_prefers_rapl(tmp_path):
    _rapl_tree(tmp_path, 0, 0)
    meter = open_meter("auto", device="cpu", root=tmp_path)
    try:
        assert isinstance(meter, RaplMeter)
    finally:
        meter.close()
