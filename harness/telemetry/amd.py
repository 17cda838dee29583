"""AMD GPUs through the `amdsmi` Python package (ROCm 6.1 and newer).

Units: `amdsmi_get_energy_count` returns ticks (`energy_accumulator`, `power` before amdsmi 6.2.1)
times `counter_resolution` µJ; `amdsmi_get_power_info` socket power in W, or the string "N/A"
where the device does not report it (current vs average differs by generation, ROCm 7 adds
`socket_power`); `amdsmi_get_gpu_activity` in %; `amdsmi_get_gpu_vram_usage` in MB. Devices are
matched by PCI BDF (torch reports the physical BDF whatever ROCR/HIP_VISIBLE_DEVICES hide), then
by UUID. On MI250X only the primary GCD of each OAM reports power, for both dies; the secondary
reports 0 or "N/A" and is marked `reports_nothing` so the job's total counts each OAM once.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Optional

from harness.telemetry.base import DeviceId, DeviceInfo, Reading, SourceUnavailable

POWER_KEYS = ("socket_power", "current_socket_power", "average_socket_power")


def _number(value: Any) -> Optional[float]:
    """amdsmi reports an unsupported value as the string "N/A"."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class AmdSmiSource:
    name = "amdsmi"
    boundary_reads = True
    independent_power = True
    min_interval_s = 0.0

    def __init__(self, ids: list[DeviceId]) -> None:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints when libamd_smi.so is missing
                import amdsmi
        except (ImportError, OSError, KeyError, AttributeError) as exc:
            raise SourceUnavailable(f"amdsmi is not importable ({type(exc).__name__}: {exc}); "
                                    "use the amdsmi package that ships with your ROCm") from exc
        self.smi = amdsmi
        try:
            amdsmi.amdsmi_init()
            handles = amdsmi.amdsmi_get_processor_handles()
        except amdsmi.AmdSmiException as exc:
            raise SourceUnavailable(f"amdsmi_init failed: {exc}") from exc
        self.handles = [self._match(i, handles) for i in ids]
        self.devices = [self._probe(i, h) for i, h in zip(ids, self.handles)]
        self.power_key = [self._power_key(h, info) for h, info in zip(self.handles, self.devices)]
        self.has_energy = [self._has_energy(h, info) for h, info in zip(self.handles, self.devices)]

    def _match(self, device_id: DeviceId, handles: list[Any]) -> Any:
        smi = self.smi
        for handle in handles:
            with contextlib.suppress(smi.AmdSmiException):
                if device_id.pci_bus_id and smi.amdsmi_get_gpu_device_bdf(handle).lower() == device_id.pci_bus_id:
                    return handle
            with contextlib.suppress(smi.AmdSmiException):
                if device_id.uuid and smi.amdsmi_get_gpu_device_uuid(handle).lower() == device_id.uuid.lower():
                    return handle
        raise SourceUnavailable(f"{device_id.label} (BDF {device_id.pci_bus_id}, UUID {device_id.uuid}) "
                                "not found among amdsmi's processors")

    def _probe(self, device_id: DeviceId, handle: Any) -> DeviceInfo:
        smi = self.smi
        name = device_id.pci_bus_id or device_id.label
        with contextlib.suppress(smi.AmdSmiException):
            name = smi.amdsmi_get_gpu_device_bdf(handle).lower()
        return DeviceInfo(name=name)

    def _power_key(self, handle: Any, info: DeviceInfo) -> Optional[str]:
        """The first power field this device reports as a number; MI250X's secondary GCD reports none."""
        smi = self.smi
        try:
            power = smi.amdsmi_get_power_info(handle)
        except smi.AmdSmiException as exc:
            info.notes.append(f"power_w: amdsmi_get_power_info failed ({exc})")
            return None
        key = next((k for k in POWER_KEYS if _number(power.get(k))), None)
        market = ""
        with contextlib.suppress(smi.AmdSmiException, KeyError):
            market = smi.amdsmi_get_gpu_asic_info(handle)["market_name"]
        if key is None and "MI250" in market:
            info.reports_nothing = True
            info.notes.append("MI250X secondary GCD: its OAM's power and energy are reported by the primary GCD")
        elif key is None:
            info.notes.append("power_w: amdsmi_get_power_info reports " +
                              ", ".join(f"{k}={power.get(k)!r}" for k in POWER_KEYS if k in power))
        return key

    def _has_energy(self, handle: Any, info: DeviceInfo) -> bool:
        if info.reports_nothing:
            return False
        try:
            self._energy_j(handle)
            return True
        except (self.smi.AmdSmiException, KeyError) as exc:
            info.notes.append(f"energy_j: amdsmi_get_energy_count failed ({type(exc).__name__}: {exc})")
            return False

    def _energy_j(self, handle: Any) -> float:
        count = self.smi.amdsmi_get_energy_count(handle)
        ticks = count["energy_accumulator"] if "energy_accumulator" in count else count["power"]
        return ticks * count["counter_resolution"] / 1e6

    def read(self, boundary: bool = False) -> list[Reading]:
        smi, out = self.smi, []
        for handle, key, has_energy in zip(self.handles, self.power_key, self.has_energy):
            reading = Reading()
            if has_energy:
                with contextlib.suppress(smi.AmdSmiException):
                    reading.energy_j = self._energy_j(handle)
            if key is not None:
                with contextlib.suppress(smi.AmdSmiException):
                    reading.power_w = _number(smi.amdsmi_get_power_info(handle).get(key))
            if boundary:
                out.append(reading)
                continue
            with contextlib.suppress(smi.AmdSmiException):
                reading.util_pct = _number(smi.amdsmi_get_gpu_activity(handle).get("gfx_activity"))
            with contextlib.suppress(smi.AmdSmiException):
                reading.memory_mb = _number(smi.amdsmi_get_gpu_vram_usage(handle).get("vram_used"))
            out.append(reading)
        return out

    def close(self) -> None:
        with contextlib.suppress(self.smi.AmdSmiException):
            self.smi.amdsmi_shut_down()
