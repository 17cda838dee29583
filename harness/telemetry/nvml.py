"""NVIDIA GPUs through nvidia-ml-py (`pynvml`).

Energy: `nvmlDeviceGetTotalEnergyConsumption` (mJ since driver load; Volta and newer; the counter
moves about every 100 ms). Power: the instant field `NVML_FI_DEV_POWER_INSTANT` (mW) read through
`nvmlDeviceGetFieldValues`, whose call can succeed while the field itself fails, so each field's
own `nvmlReturn` is checked; drivers without the field fall back to `nvmlDeviceGetPowerUsage`
(mW, a 1 s average on Ampere and newer). Each quantity is probed once per device: one that raises
`NVMLError_NotSupported` or `NVMLError_NoPermission` is noted and never asked again.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from harness.telemetry.base import DeviceId, DeviceInfo, Reading, SourceUnavailable

# c_nvmlValue_t member for each NVML_VALUE_TYPE_* (0..6).
_VALUE_MEMBER = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")


def nvml_bus_id(pci_bus_id: str) -> str:
    """NVML spells bus ids with an 8-digit upper-case domain: 00000000:3B:00.0."""
    domain, rest = pci_bus_id.split(":", 1)
    return f"{int(domain, 16):08X}:{rest.upper()}"


class NvmlSource:
    name = "nvml"
    boundary_reads = True
    independent_power = True
    min_interval_s = 0.0

    def __init__(self, ids: list[DeviceId]) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise SourceUnavailable(f"nvidia-ml-py is not installed ({exc}); pip install nvidia-ml-py") from exc
        self.nv = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise SourceUnavailable(f"nvmlInit failed: {exc}") from exc
        self.handles = [self._handle(i) for i in ids]
        self.devices: list[DeviceInfo] = []
        self.readers: list[dict[str, Callable[[], Optional[float]]]] = []
        for device_id, handle in zip(ids, self.handles):
            info = DeviceInfo(name=self._name(device_id, handle))
            self.devices.append(info)
            self.readers.append(self._probe(handle, info))

    def _handle(self, device_id: DeviceId) -> Any:
        """By UUID first (exact under any CUDA_VISIBLE_DEVICES), then by PCI bus id."""
        nv, tried = self.nv, []
        if device_id.uuid:
            uuid = device_id.uuid if device_id.uuid.startswith(("GPU-", "MIG-")) else f"GPU-{device_id.uuid}"
            try:
                return nv.nvmlDeviceGetHandleByUUID(uuid)
            except nv.NVMLError as exc:
                tried.append(f"UUID {uuid}: {exc}")
        if device_id.pci_bus_id:
            bus_id = nvml_bus_id(device_id.pci_bus_id)
            try:
                return nv.nvmlDeviceGetHandleByPciBusId(bus_id)
            except nv.NVMLError as exc:
                tried.append(f"PCI {bus_id}: {exc}")
        raise SourceUnavailable(f"{device_id.label} not found in NVML ({'; '.join(tried) or 'no UUID or PCI id'})")

    def _name(self, device_id: DeviceId, handle: Any) -> str:
        try:
            return self.nv.nvmlDeviceGetUUID(handle)
        except self.nv.NVMLError:
            return device_id.uuid or device_id.pci_bus_id or device_id.label

    def _probe(self, handle: Any, info: DeviceInfo) -> dict[str, Callable[[], Optional[float]]]:
        """The readers that work on this device; a failing quantity is noted once and dropped."""
        nv = self.nv
        candidates: dict[str, list[tuple[str, Callable[[], Optional[float]]]]] = {
            "energy_j": [("nvmlDeviceGetTotalEnergyConsumption",
                          lambda: nv.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3)],
            "power_w": [("NVML_FI_DEV_POWER_INSTANT", lambda: self._field_mw(handle) / 1e3),
                        ("nvmlDeviceGetPowerUsage", lambda: nv.nvmlDeviceGetPowerUsage(handle) / 1e3)],
            "util_pct": [("nvmlDeviceGetUtilizationRates",
                          lambda: float(nv.nvmlDeviceGetUtilizationRates(handle).gpu))],
            "memory_mb": [("nvmlDeviceGetMemoryInfo", lambda: nv.nvmlDeviceGetMemoryInfo(handle).used / 2**20)],
        }
        readers = {}
        for quantity, options in candidates.items():
            for api, read in options:
                try:
                    read()
                except nv.NVMLError as exc:
                    info.notes.append(f"{quantity}: {api} {type(exc).__name__} ({exc})")
                    continue
                readers[quantity] = read
                if api == "nvmlDeviceGetPowerUsage":
                    info.notes.append("power_w: nvmlDeviceGetPowerUsage (a 1 s average on Ampere and newer)")
                break
        return readers

    def _field_mw(self, handle: Any) -> float:
        value = self.nv.nvmlDeviceGetFieldValues(handle, [self.nv.NVML_FI_DEV_POWER_INSTANT])[0]
        if value.nvmlReturn != self.nv.NVML_SUCCESS:
            raise self.nv.NVMLError(value.nvmlReturn)
        return float(getattr(value.value, _VALUE_MEMBER[value.valueType]))

    def read(self, boundary: bool = False) -> list[Reading]:
        out = []
        for readers in self.readers:
            reading = Reading()
            for quantity, read in readers.items():
                if boundary and quantity not in ("energy_j", "power_w"):
                    continue
                try:
                    setattr(reading, quantity, read())
                except self.nv.NVMLError:  # a transient failure: this sample lacks the value
                    pass
            out.append(reading)
        return out

    def processes(self) -> list[Optional[list[int]]]:
        """Per device, the pids computing on it (nvmlDeviceGetComputeRunningProcesses); None where NVML will not
        say (NotSupported, or NoPermission in some containers). In a container's PID namespace the pids are the
        host's, so callers compare counts as well as pids."""
        out: list[Optional[list[int]]] = []
        for handle in self.handles:
            try:
                out.append(sorted({p.pid for p in self.nv.nvmlDeviceGetComputeRunningProcesses(handle)}))
            except self.nv.NVMLError:
                out.append(None)
        return out

    def close(self) -> None:
        try:
            self.nv.nvmlShutdown()
        except self.nv.NVMLError:
            pass
