"""Telemetry: every source against a fake that follows the real library, the sampler's windows, and runs.

No GPU and no RAPL here, so pynvml's C entry points are replaced with a fake device (the real
module's error classes, constants and ctypes structs stay), amdsmi is a stand-in module with the
real function names and dict shapes, and RAPL is a powercap tree in a temporary directory.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any, Optional

import pynvml
import pytest
from conftest import TINY, harness_run

from harness.config.schema import TelemetryConfig
from harness.core.errors import ConfigError
from harness.telemetry import open_source
from harness.telemetry.amd import AmdSmiSource
from harness.telemetry.base import DeviceId, SourceUnavailable
from harness.telemetry.devices import device_id_from_properties
from harness.telemetry.nvml import NvmlSource
from harness.telemetry.rapl import RaplSource
from harness.telemetry.rocm_smi import RocmSmiSource
from harness.telemetry.sampler import Sampler
from harness.telemetry.summary import energy_metrics, step_fields

UUID = "GPU-5c2a1e6b-0f3e-4d7a-9a51-3f1d2c3b4a59"
BUS = "0000:3b:00.0"
ID = DeviceId(uuid=UUID.removeprefix("GPU-"), pci_bus_id=BUS, label="cuda:0")  # torch's uuid has no prefix


# ---------------------------------------------------------------------------------------------
# A fake NVML device behind the real pynvml module
# ---------------------------------------------------------------------------------------------
class FakeGpu:
    """Draws `power_w`; its energy counter (mJ) moves only every 100 ms, as on real boards."""

    def __init__(self, uuid: str = UUID, bus_id: str = "00000000:3B:00.0", power_w: float = 200.0, *,
                 errors: Optional[dict[str, int]] = None, field_return: int = pynvml.NVML_SUCCESS,
                 counter_stuck: bool = False) -> None:
        self.uuid, self.bus_id, self.power_w = uuid, bus_id, power_w
        self.errors = errors or {}
        self.field_return, self.counter_stuck = field_return, counter_stuck
        self.t0 = time.perf_counter()

    def check(self, api: str) -> None:
        if api in self.errors:
            raise pynvml.NVMLError(self.errors[api])

    def energy_mj(self) -> int:
        ticks = 0 if self.counter_stuck else math.floor((time.perf_counter() - self.t0) / 0.1)
        return 123_456_789 + int(self.power_w * ticks * 0.1 * 1e3)


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch):
    """Install fake devices: `fake_nvml(FakeGpu(...), ...)`; returns the calls made."""

    def install(*gpus: FakeGpu) -> list[str]:
        calls: list[str] = []
        by_uuid = {g.uuid: g for g in gpus}
        by_bus = {g.bus_id: g for g in gpus}

        def api(name: str, fn: Any) -> None:
            def wrapper(*args: Any) -> Any:
                calls.append(name)
                return fn(*args)
            monkeypatch.setattr(pynvml, name, wrapper)

        def lookup(table: dict[str, FakeGpu], key: str) -> FakeGpu:
            if key not in table:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
            return table[key]

        def field_values(gpu: FakeGpu, field_ids: list[int]) -> Any:
            values = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
            for value, field_id in zip(values, field_ids):
                value.fieldId = field_id
                value.nvmlReturn = gpu.field_return  # the call succeeds; the field may not
                value.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                value.value.uiVal = int(gpu.power_w * 1e3)
            return values

        def guarded(name: str, value: Any) -> Any:
            def read(gpu: FakeGpu, *rest: Any) -> Any:
                gpu.check(name)
                return value(gpu, *rest)
            return read

        api("nvmlInit", lambda: None)
        api("nvmlShutdown", lambda: None)
        api("nvmlDeviceGetHandleByIndex", lambda i: pytest.fail("a device must never be found by its CUDA index"))
        api("nvmlDeviceGetHandleByUUID", lambda uuid: lookup(by_uuid, uuid))
        api("nvmlDeviceGetHandleByPciBusId", lambda bus: lookup(by_bus, bus))
        api("nvmlDeviceGetUUID", lambda gpu: gpu.uuid)
        api("nvmlDeviceGetTotalEnergyConsumption", guarded("energy", FakeGpu.energy_mj))
        api("nvmlDeviceGetFieldValues", guarded("fields", field_values))
        api("nvmlDeviceGetPowerUsage", guarded("power_usage", lambda g: int(g.power_w * 1e3)))
        api("nvmlDeviceGetUtilizationRates", guarded("util", lambda g: pynvml.c_nvmlUtilization_t(gpu=87, memory=40)))
        api("nvmlDeviceGetMemoryInfo", guarded("memory", lambda g: pynvml.c_nvmlMemory_t(
            total=80 * 2**30, free=70 * 2**30, used=10 * 2**30)))
        return calls

    return install


def test_nvml_units_and_lookup_by_uuid(fake_nvml: Any) -> None:
    calls = fake_nvml(FakeGpu(power_w=250.0))
    source = NvmlSource([ID])
    reading = source.read()[0]
    assert reading.power_w == 250.0  # mW -> W
    assert reading.energy_j == pytest.approx(123_456.789)  # mJ -> J
    assert reading.util_pct == 87 and reading.memory_mb == 10 * 1024  # bytes -> MB
    assert source.devices[0].name == UUID and source.devices[0].notes == []
    assert "nvmlDeviceGetHandleByUUID" in calls and "nvmlDeviceGetHandleByPciBusId" not in calls


def test_nvml_falls_back_to_pci_bus_id(fake_nvml: Any) -> None:
    """A MIG or otherwise unmatched UUID: the 8-digit-domain PCI bus id finds the board."""
    calls = fake_nvml(FakeGpu(uuid="GPU-another"))
    source = NvmlSource([ID])
    assert source.read()[0].power_w == 200.0
    assert calls[:3] == ["nvmlInit", "nvmlDeviceGetHandleByUUID", "nvmlDeviceGetHandleByPciBusId"]


def test_nvml_device_not_found_is_unavailable(fake_nvml: Any) -> None:
    fake_nvml(FakeGpu(uuid="GPU-x", bus_id="00000000:AF:00.0"))
    with pytest.raises(SourceUnavailable, match="cuda:0 not found in NVML.*Not Found"):
        NvmlSource([ID])


def test_nvml_per_field_return_code_falls_back_to_power_usage(fake_nvml: Any) -> None:
    """nvmlDeviceGetFieldValues returns success while the instant-power field itself is NotSupported."""
    fake_nvml(FakeGpu(power_w=90.0, field_return=pynvml.NVML_ERROR_NOT_SUPPORTED))
    source = NvmlSource([ID])
    assert source.read()[0].power_w == 90.0
    notes = " ".join(source.devices[0].notes)
    assert "NVML_FI_DEV_POWER_INSTANT NVMLError_NotSupported" in notes and "1 s average" in notes


def test_nvml_not_supported_and_no_permission_per_quantity(fake_nvml: Any) -> None:
    """A pre-Volta board has no energy counter; a container may lack permission for utilisation."""
    fake_nvml(FakeGpu(errors={"energy": pynvml.NVML_ERROR_NOT_SUPPORTED, "util": pynvml.NVML_ERROR_NO_PERMISSION}))
    source = NvmlSource([ID])
    reading = source.read()[0]
    assert reading.energy_j is None and reading.util_pct is None and reading.power_w == 200.0
    notes = " ".join(source.devices[0].notes)
    assert "energy_j: nvmlDeviceGetTotalEnergyConsumption NVMLError_NotSupported" in notes
    assert "util_pct: nvmlDeviceGetUtilizationRates NVMLError_NoPermission" in notes


def test_nvml_init_failure_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_driver() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    with pytest.raises(SourceUnavailable, match="nvmlInit failed: Driver Not Loaded"):
        NvmlSource([ID])


def test_device_id_from_torch_properties() -> None:
    """torch describes the physical device behind a visible index, whatever CUDA_VISIBLE_DEVICES says."""
    props = types.SimpleNamespace(uuid="5c2a1e6b-0f3e-4d7a-9a51-3f1d2c3b4a59", pci_domain_id=0, pci_bus_id=0x3B,
                                  pci_device_id=0)
    assert device_id_from_properties(props, "cuda:0") == ID
    old = types.SimpleNamespace(uuid=None)  # an old torch without PCI attributes
    assert device_id_from_properties(old, "cuda:1") == DeviceId(None, None, "cuda:1")


# ---------------------------------------------------------------------------------------------
# The sampler on the fake NVML: windows, idle power, the counter check
# ---------------------------------------------------------------------------------------------
def sampler_for(source: Any, *, idle_s: float = 0.35, warmup: int = 0) -> Sampler:
    return Sampler(source, reason=None, shared=False, interval_s=0.02, idle_s=idle_s, warmup_steps=warmup,
                   host="h", rank=0)


def run_steps(sampler: Sampler, seconds: list[float]) -> tuple[list[Any], list[float]]:
    sampler.start()
    t = time.perf_counter()
    sampler.mark_step(t)
    readings, durations = [], []
    for s in seconds:
        time.sleep(s)
        now = time.perf_counter()
        readings.append(sampler.mark_step(now))
        durations.append(now - t)
        t = now
    return readings, durations


def test_sampler_counter_windows_sum_to_power_times_time(fake_nvml: Any) -> None:
    fake_nvml(FakeGpu(power_w=300.0))
    sampler = sampler_for(NvmlSource([ID]), warmup=1)
    readings, durations = run_steps(sampler, [0.05, 0.3, 0.3, 0.03, 0.3])
    report = sampler.stop()
    device = report["devices"][0]
    assert device["energy_method"] == "counter" and device["notes"] == []
    assert device["idle_power_w"] == pytest.approx(300.0, rel=0.35)  # 0.35 s of a 100 ms counter
    total = sum(r.energy_j for r in readings)  # quantisation cancels in the sum, up to one 100 ms tick
    assert total == pytest.approx(300.0 * sum(durations), abs=300.0 * 0.1 + 1.0)
    assert min(r.energy_j for r in readings) >= 0
    assert all(r.devices == 1 and r.util_sum == 87 and r.util_devices == 1 for r in readings)
    assert device["counter_over_integrated"] == pytest.approx(1.0, rel=0.2)
    assert report["sampler_cpu_s"] > 0 and report["samples"] and report["samples"][0][1] == UUID


def test_sampler_rejects_a_stuck_counter_and_integrates_power(fake_nvml: Any) -> None:
    fake_nvml(FakeGpu(power_w=150.0, counter_stuck=True))
    sampler = sampler_for(NvmlSource([ID]))
    readings, durations = run_steps(sampler, [0.1, 0.1])
    report = sampler.stop()
    device = report["devices"][0]
    assert device["energy_method"] == "integration"
    assert "energy counter rejected" in " ".join(device["notes"])
    for reading, seconds in zip(readings, durations):
        assert reading.energy_j == pytest.approx(150.0 * seconds, rel=0.05)


def test_sampler_without_a_source_reports_nan_and_measures_the_process() -> None:
    sampler = Sampler(None, reason="no GPU", shared=False, interval_s=0.1, idle_s=3.0, warmup_steps=0,
                      host="h", rank=0)
    start = time.perf_counter()
    readings, _ = run_steps(sampler, [0.01, 0.25])
    assert time.perf_counter() - start < 1.0, "no idle wait without a source"
    assert math.isnan(readings[0].energy_j) and readings[0].devices == 0
    # the first step ends before the thread's first interval: measured at its own two ends instead
    assert readings[0].process_cpu_pct >= 0 and readings[0].process_rss_mb > 10
    assert readings[1].process_rss_mb > 10 and readings[1].process_cpu_pct >= 0
    report = sampler.stop()
    assert report["source"] is None and report["reason"] == "no GPU" and report["samples"] == []
    assert sampler.stop() is report  # a watchdog and the normal exit may both finish the run


# ---------------------------------------------------------------------------------------------
# amdsmi (a stand-in module with the real names and dict shapes) and rocm-smi
# ---------------------------------------------------------------------------------------------
class AmdSmiLibraryException(Exception):
    def __init__(self, err_code: int) -> None:
        super().__init__(f"Error code:\n\t{err_code} | AMDSMI_STATUS")
        self.err_code = err_code

    def get_error_code(self) -> int:
        return self.err_code


def fake_amdsmi(gcds: dict[str, dict[str, Any]]) -> types.ModuleType:
    """Handles are BDF strings; 'N/A' where the device does not report a value, as amdsmi does."""
    mod = types.ModuleType("amdsmi")
    mod.AmdSmiException = Exception  # the real AmdSmiLibraryException derives from AmdSmiException
    mod.AmdSmiLibraryException = AmdSmiLibraryException
    NOT_SUPPORTED = 2

    def gcd(handle: str) -> dict[str, Any]:
        return gcds[handle]

    def energy(handle: str) -> dict[str, Any]:
        g = gcd(handle)
        if g.get("energy") is None:
            raise AmdSmiLibraryException(NOT_SUPPORTED)
        return {g.get("energy_key", "energy_accumulator"): g["energy"], "counter_resolution": 15.259,
                "timestamp": 1}

    def activity(handle: str) -> dict[str, Any]:
        if gcd(handle).get("activity_error"):
            raise AmdSmiLibraryException(NOT_SUPPORTED)
        return {"gfx_activity": gcd(handle).get("gfx", 0), "umc_activity": 5, "mm_activity": "N/A"}

    mod.amdsmi_init = lambda *flags: None
    mod.amdsmi_shut_down = lambda: None
    mod.amdsmi_get_processor_handles = lambda: list(gcds)
    mod.amdsmi_get_gpu_device_bdf = lambda h: h
    mod.amdsmi_get_gpu_device_uuid = lambda h: gcd(h)["uuid"]
    mod.amdsmi_get_gpu_asic_info = lambda h: {"market_name": gcd(h)["market"]}
    mod.amdsmi_get_power_info = lambda h: {"current_socket_power": gcd(h).get("current", "N/A"),
                                           "average_socket_power": gcd(h).get("average", "N/A"),
                                           "gfx_voltage": "N/A", "soc_voltage": "N/A", "mem_voltage": "N/A",
                                           "power_limit": 560}
    mod.amdsmi_get_energy_count = energy
    mod.amdsmi_get_gpu_activity = activity
    mod.amdsmi_get_gpu_vram_usage = lambda h: {"vram_total": 65520, "vram_used": gcd(h).get("vram", 1024)}
    return mod


MI250X = {
    "0000:c1:00.0": {"uuid": "u0", "market": "AMD Instinct MI250X", "current": "N/A", "average": 412,
                     "energy": 2_000_000, "gfx": 97, "vram": 30000},
    "0000:c6:00.0": {"uuid": "u1", "market": "AMD Instinct MI250X", "current": "N/A", "average": 0,
                     "energy": 0, "gfx": 95},
}


def amd_id(bdf: str) -> DeviceId:
    return DeviceId(uuid=None, pci_bus_id=bdf, label="cuda:0")


def test_amdsmi_units_na_and_the_mi250x_secondary_die(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi(MI250X))
    source = AmdSmiSource([amd_id("0000:c1:00.0"), amd_id("0000:c6:00.0")])
    primary, secondary = source.read()
    assert primary.power_w == 412.0  # "N/A" current power: the average is used, in W already
    assert primary.energy_j == pytest.approx(2_000_000 * 15.259e-6)  # ticks x µJ resolution -> J
    assert primary.util_pct == 97 and primary.memory_mb == 30000
    assert secondary.power_w is None and secondary.energy_j is None and secondary.util_pct == 95
    assert not source.devices[0].reports_nothing and source.devices[1].reports_nothing
    assert "primary GCD" in source.devices[1].notes[0]
    sampler = sampler_for(source, idle_s=0.0)
    readings, _ = run_steps(sampler, [0.02])
    report = sampler.stop()
    assert [d["energy_method"] for d in report["devices"]] == ["counter", "attributed"]
    assert readings[0].devices == 2 and readings[0].energy_j == 0.0  # the fake counter is still; OAM counted once


def test_amdsmi_old_energy_key_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    gcds = {"0000:03:00.0": {"uuid": "u", "market": "AMD Instinct MI100", "current": 95, "energy": 10,
                             "energy_key": "power", "activity_error": True},
            "0000:83:00.0": {"uuid": "w", "market": "AMD Instinct MI100", "current": "N/A", "energy": None}}
    monkeypatch.setitem(sys.modules, "amdsmi", fake_amdsmi(gcds))
    source = AmdSmiSource([amd_id("0000:03:00.0"), DeviceId(uuid="W", pci_bus_id=None, label="cuda:1")])
    first, second = source.read()
    assert first.energy_j == pytest.approx(10 * 15.259e-6) and first.power_w == 95 and first.util_pct is None
    assert second.energy_j is None and second.power_w is None  # found by UUID; reports nothing, not an MI250X
    notes = " ".join(source.devices[1].notes)
    assert "current_socket_power='N/A'" in notes and "amdsmi_get_energy_count failed" in notes
    assert not source.devices[1].reports_nothing


def test_amdsmi_missing_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "amdsmi", None)  # import amdsmi -> ImportError
    with pytest.raises(SourceUnavailable, match="amdsmi is not importable"):
        AmdSmiSource([amd_id("0000:c1:00.0")])


def test_rocm_smi_json() -> None:
    cards = {"card0": {"PCI Bus": "0000:C1:00.0", "Average Graphics Package Power (W)": "412.0",
                       "GPU use (%)": "97", "Energy counter": "62929744071539",
                       "Accumulated Energy (uJ)": "962825096297442.9"},
             "card1": {"PCI Bus": "0000:C6:00.0", "Average Graphics Package Power (W)": "N/A", "GPU use (%)": "95"},
             "system": {"Driver version": "6.2.4"}}
    source = RocmSmiSource([amd_id("0000:c1:00.0"), amd_id("0000:c6:00.0")], query=lambda: cards)
    primary, secondary = source.read()
    assert primary.power_w == 412.0 and primary.energy_j == pytest.approx(962825096.2974429) and primary.util_pct == 97
    assert secondary.power_w is None and source.devices[1].reports_nothing
    assert not source.boundary_reads and source.min_interval_s >= 1.0  # a process per read


# ---------------------------------------------------------------------------------------------
# RAPL on a fake powercap tree
# ---------------------------------------------------------------------------------------------
def zone(path: Path, name: str, energy_uj: int, max_uj: int = 262_143_328_850) -> Path:
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj:020d}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return path


def set_energy(zone_path: Path, energy_uj: int) -> None:
    """In place and fixed width, in one write: the source keeps the file open and preads it, like sysfs."""
    with open(zone_path / "energy_uj", "r+") as f:
        f.write(f"{energy_uj:020d}\n")


@pytest.fixture
def powercap(tmp_path: Path) -> Path:
    """Two sockets; package 0 has core (inside the package) and dram (outside it) subzones; psys on top."""
    root = tmp_path / "powercap"
    zone(root / "intel-rapl:0", "package-0", 1_000_000, max_uj=10_000_000)
    zone(root / "intel-rapl:0" / "intel-rapl:0:0", "core", 500_000)
    zone(root / "intel-rapl:0" / "intel-rapl:0:1", "dram", 2_000_000)
    zone(root / "intel-rapl:1", "package-1", 0)
    zone(root / "intel-rapl:2", "psys", 5_000_000)
    return root


def test_rapl_counts_package_and_dram_once_per_socket(powercap: Path) -> None:
    source = RaplSource(powercap)
    assert [d.name for d in source.devices] == ["package-0", "package-1"]
    assert source.devices[0].notes == ["domains: package-0 + dram"]
    assert [r.energy_j for r in source.read()] == [0.0, 0.0]
    set_energy(powercap / "intel-rapl:0", 3_000_000)  # +2 J package
    set_energy(powercap / "intel-rapl:0" / "intel-rapl:0:0", 1_500_000)  # core: inside the package, not added
    set_energy(powercap / "intel-rapl:0" / "intel-rapl:0:1", 2_500_000)  # +0.5 J dram
    set_energy(powercap / "intel-rapl:2", 9_000_000)  # psys: the platform, not added
    package0, package1 = source.read()
    assert package0.energy_j == pytest.approx(2.5) and package1.energy_j == 0.0
    assert package0.power_w is not None and package0.power_w > 0  # the counter's rate between reads


def test_rapl_unwraps_at_max_energy_range(powercap: Path) -> None:
    source = RaplSource(powercap)
    source.read()
    set_energy(powercap / "intel-rapl:0", 9_500_000)  # +8.5 J
    source.read()
    set_energy(powercap / "intel-rapl:0", 500_000)  # wrapped at 10 J: +1 J
    assert source.read()[0].energy_j == pytest.approx(9.5)


def test_rapl_root_only_counter_is_reported_not_read_around(powercap: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def open_(path: Any, flags: int, *args: Any) -> int:
        if str(path).endswith("energy_uj"):  # mode 0400 root:root since CVE-2020-8694; we run as root here
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", open_)
    with pytest.raises(SourceUnavailable, match="readable by root only"):
        RaplSource(powercap)


def test_open_source_choices(powercap: Path, tmp_path: Path) -> None:
    cpu = {"device_type": "cpu", "device_index": None, "rocm": False}
    source, reason, shared = open_source("auto", local_rank=0, powercap_root=powercap, **cpu)
    assert source is not None and source.name == "rapl" and reason is None
    assert open_source("auto", local_rank=1, powercap_root=powercap, **cpu) == (None, None, True)
    _, reason, _ = open_source("auto", local_rank=0, powercap_root=tmp_path / "none", **cpu)
    assert "no GPU, and RAPL is unavailable: no RAPL package domains" in reason
    _, reason, _ = open_source("nvml", local_rank=0, powercap_root=powercap, **cpu)
    assert "measures GPUs" in reason
    assert open_source("none", local_rank=0, powercap_root=powercap, **cpu)[1] == "telemetry.source=none"


# ---------------------------------------------------------------------------------------------
# From ranks to the job, and from steps to the summary
# ---------------------------------------------------------------------------------------------
def test_step_fields_sum_devices_over_ranks() -> None:
    # energy, devices, util_sum, util_devices, cpu %, rss MB
    gpu_ranks = [[30.0, 1, 90.0, 1, 100.0, 900.0], [10.0, 2, 150.0, 2, 110.0, 1000.0]]
    fields = step_fields(gpu_ranks, 0.1)
    assert fields["energy_j"] == 40.0 and fields["power_w"] == pytest.approx(40.0 / 0.1 / 3)
    assert fields["gpu_util_pct"] == 80.0 and fields["process_cpu_pct"] == 105.0 and fields["process_rss_mb"] == 1000
    shared = [[5.0, 2, 0.0, 0, 100.0, 1.0], [0.0, 0, 0.0, 0, 100.0, 1.0]]  # local rank 1 shares rank 0's RAPL
    assert step_fields(shared, 1.0)["energy_j"] == 5.0 and step_fields(shared, 1.0)["power_w"] == 2.5
    partial = [[30.0, 1, 0.0, 0, 1.0, 1.0], [math.nan, 0, 0.0, 0, 1.0, 1.0]]  # a rank measured nothing
    assert step_fields(partial, 1.0)["energy_j"] is None and step_fields(partial, 1.0)["power_w"] is None


def test_energy_metrics_mean_energy_and_time_weighted_power() -> None:
    steps = [{"warmup": True, "iter_time_ms": 500, "energy_j": 99.0, "power_w": 198.0, "tokens_per_s": 2000,
              "model_tflops_per_device": 1.0, "gpu_util_pct": 10.0, "process_cpu_pct": 100, "process_rss_mb": 1}]
    for ms, energy in ((100, 10.0), (100, 30.0), (200, 40.0)):  # a 100 ms counter moved late in step 1
        steps.append({"warmup": False, "iter_time_ms": ms, "energy_j": energy, "power_w": energy / (ms / 1e3),
                      "tokens_per_s": 1000 / (ms / 1e3), "model_tflops_per_device": 2.0 * 100 / ms,
                      "gpu_util_pct": 90.0 + ms / 100, "process_cpu_pct": 100, "process_rss_mb": 1})
    m = energy_metrics(steps, world_size=4)
    assert m["energy_j_per_step"] == pytest.approx(80.0 / 3)
    assert m["power_w"] == pytest.approx(80.0 / 0.4)  # total energy over total time
    assert m["tokens_per_joule"] == pytest.approx(1000 / (80.0 / 3))
    assert m["tflops_per_watt"] == pytest.approx(4 * (2.0 * 0.1 + 2.0 * 0.1 + 1.0 * 0.2) / 80.0)  # TFLOP per J
    assert m["gpu_util_pct_mean"] == pytest.approx(91.333, rel=1e-3) and m["gpu_util_pct_std"] > 0
    steps[2]["energy_j"] = None
    assert energy_metrics(steps, world_size=4)["energy_j_per_step"] is None  # one unmeasured step: no partial total


@pytest.mark.parametrize("field,value,message", [
    ("source", "nvidia", "telemetry.source=nvidia"), ("interval_ms", 1, "telemetry.interval_ms=1"),
    ("idle_s", -1, "telemetry.idle_s=-1")])
def test_config_rejects_bad_telemetry(field: str, value: Any, message: str) -> None:
    from omegaconf import OmegaConf

    from harness.config.checks import validate
    from harness.config.schema import Config

    cfg = OmegaConf.structured(Config)
    cfg.model.update(name="t", n_layers=1, d_model=8, n_heads=1, seq_len=8, vocab_size=16)
    validate(cfg, 1)
    setattr(cfg.telemetry, field, value)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, 1)
    assert TelemetryConfig().interval_ms == 100


# ---------------------------------------------------------------------------------------------
# Real runs
# ---------------------------------------------------------------------------------------------
def test_cpu_run_reports_what_it_did_not_measure(tmp_path: Path) -> None:
    """This host has no GPU and no /sys/class/powercap: null power and energy with the reason; psutil measured."""
    run = harness_run(tmp_path / "cpu", *TINY)
    metrics, telemetry = run.summary["metrics"], run.summary["telemetry"]
    for key in ("power_w", "idle_power_w", "energy_j_per_step", "tokens_per_joule", "tflops_per_watt"):
        assert metrics[key] is None and "RAPL is unavailable" in metrics[f"{key}_reason"]
    assert telemetry["source"] is None and "no GPU" in telemetry["reason"] and telemetry["power_csv"] is None
    assert metrics["process_cpu_pct"] > 0 and metrics["process_rss_mb"] > 0
    # every step's CPU %: the sampling thread's latest interval, or the step itself where it ends before the first
    assert all(s["energy_j"] is None and s["process_cpu_pct"] is not None for s in run.steps)
    assert not (run.run_dir / "power.csv").exists()


def test_two_rank_run_on_a_rapl_host(tmp_path: Path, powercap: Path) -> None:
    """A CPU host whose package draws 40 W (a thread advances the fake counter): measured once, not per rank."""
    package = powercap / "intel-rapl:0"
    stop = threading.Event()

    def draw() -> None:
        start, base = time.perf_counter(), 1_000_000
        while not stop.wait(0.005):
            set_energy(package, base + int(40e6 * (time.perf_counter() - start)))
    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    try:
        run = harness_run(tmp_path / "rapl", *TINY, "launcher.nproc=2", f"telemetry.powercap_root={powercap}",
                          "telemetry.idle_s=0.5")
    finally:
        stop.set()
        thread.join()
    metrics, telemetry = run.summary["metrics"], run.summary["telemetry"]
    assert telemetry["source"] == "rapl" and telemetry["reason"] is None
    devices = {(d["rank"], d["device"]): d for d in telemetry["devices"]}
    assert set(devices) == {(0, "package-0"), (0, "package-1")}  # rank 1 shares the host's zones
    assert telemetry["idle_power_w"] == pytest.approx(20.0, rel=0.25)  # 40 W + 0 W over two sockets
    assert metrics["power_w"] == pytest.approx(20.0, rel=0.25)
    timed = [s for s in run.steps if not s["warmup"]]
    assert metrics["energy_j_per_step"] == pytest.approx(40.0 * sum(s["iter_time_ms"] for s in timed) / 1e3
                                                         / len(timed), rel=0.25)
    assert metrics["tokens_per_joule"] > 0 and metrics["tflops_per_watt"] > 0
    lines = (run.run_dir / "power.csv").read_text().splitlines()
    assert lines[0] == "time_unix_s,host,device,power_w,energy_j,util_pct,memory_mb" and len(lines) > 4
    assert json.loads(json.dumps(telemetry))["power_csv"] == "power.csv"
    assert os.path.getsize(run.run_dir / "summary.json") > 0


def test_other_processes_on_a_gpu_are_found_and_flagged(fake_nvml: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML lists every process computing on a device; those that are not the job's ranks make the run's
    timings include their work, which the summary's warnings say."""
    from harness.telemetry.summary import busy_host_warnings, gpu_co_tenants, host_load

    fake_nvml(FakeGpu())
    listed = [pynvml.c_nvmlProcessInfo_t(pid=os.getpid(), usedGpuMemory=2**30),
              pynvml.c_nvmlProcessInfo_t(pid=4242, usedGpuMemory=2**30)]
    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", lambda handle: listed)
    source = NvmlSource([ID])
    assert source.processes() == [sorted([os.getpid(), 4242])]
    report = {"host": "node1", "pid": os.getpid(), "device_processes": {UUID: source.processes()[0]},
              "host_load": {"cores": 8, "busy_cores": 1.0, "own_cpu_pct": 100.0, "steal_pct": 0.0, "load1_max": 1.0}}
    assert gpu_co_tenants([report]) == {UUID: 1}
    warnings = busy_host_warnings(host_load([report]), None)
    assert len(warnings) == 1 and f"{UUID} on node1 was shared: 1 other process" in warnings[0]
    # In a container's PID namespace NVML's pids are the host's: one rank on the device, two processes listed.
    assert gpu_co_tenants([{**report, "pid": 7}]) == {UUID: 1}
    alone = {**report, "device_processes": {UUID: [os.getpid()]}}
    assert gpu_co_tenants([alone]) == {} and busy_host_warnings(host_load([alone]), None) == []

    def refused(handle: Any) -> Any:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", refused)
    assert source.processes() == [None]
