"""Which physical device a rank uses, as NVML/amdsmi know it (UUID, PCI bus id).

torch's device properties already describe the physical device behind the rank's visible index,
so CUDA_VISIBLE_DEVICES given as indices or as UUIDs, and ROCR/HIP_VISIBLE_DEVICES on ROCm, need
no parsing here; the CUDA index itself is never used to pick an NVML/amdsmi handle (NVML counts
in PCI order, CUDA by default fastest first).
"""

from __future__ import annotations

from typing import Any, Optional

from harness.telemetry.base import DeviceId


def pci_bus_id(props: Any) -> Optional[str]:
    """`dddd:bb:dd.0` from torch's pci_domain_id / pci_bus_id / pci_device_id (torch >= 2.5)."""
    parts = [getattr(props, k, None) for k in ("pci_domain_id", "pci_bus_id", "pci_device_id")]
    if any(p is None for p in parts):
        return None
    domain, bus, device = parts
    return f"{domain:04x}:{bus:02x}:{device:02x}.0"


def device_id_from_properties(props: Any, label: str) -> DeviceId:
    uuid = getattr(props, "uuid", None)
    return DeviceId(uuid=str(uuid) if uuid else None, pci_bus_id=pci_bus_id(props), label=label)


def cuda_device_id(index: int) -> DeviceId:
    import torch

    return device_id_from_properties(torch.cuda.get_device_properties(index), f"cuda:{index}")
