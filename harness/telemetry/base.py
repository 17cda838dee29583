"""The one small interface every power source implements, and the units it speaks.

A source reads all of this rank's devices at once and returns one `Reading` per device, already
converted to SI units (J, W, %, MB): the vendor's own units (NVML mJ/mW, amdsmi W and µJ ticks,
RAPL µJ) never leave the source module that knows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol


class SourceUnavailable(RuntimeError):
    """This source cannot measure here; the message says why (it becomes the summary's reason)."""


@dataclass(frozen=True)
class DeviceId:
    """How a rank's device is found in NVML/amdsmi: by UUID or PCI bus id, never by CUDA index."""

    uuid: Optional[str]
    pci_bus_id: Optional[str]
    """Lower-case `dddd:bb:dd.f` (amdsmi style); NVML's 8-digit domain form is derived from it."""
    label: str
    """What the rank calls it (e.g. `cuda:0`), for messages."""


@dataclass
class Reading:
    """One device at one instant. `energy_j` is a cumulative counter; None = not reported."""

    energy_j: Optional[float] = None
    power_w: Optional[float] = None
    util_pct: Optional[float] = None
    memory_mb: Optional[float] = None


@dataclass
class DeviceInfo:
    """What a source found out about one device when it opened it."""

    name: str
    """UUID, PCI bus id or RAPL domain: what power.csv and the summary call the device."""
    notes: list[str] = field(default_factory=list)
    """Quantities the device does not report, and why (NotSupported, NoPermission, "N/A", ...)."""
    reports_nothing: bool = False
    """MI250X secondary GCD: its power and energy are reported by the OAM's primary GCD."""


class Source(Protocol):
    name: str
    devices: list[DeviceInfo]
    boundary_reads: bool
    """Cheap enough (tens of µs) to read synchronously at every step boundary."""
    independent_power: bool
    """Power is measured apart from the energy counter, so one can check the other (not RAPL's)."""
    min_interval_s: float

    def read(self, boundary: bool = False) -> list[Reading]:
        """All devices now; at a step `boundary` only energy and power are needed (fewer calls)."""
        ...

    def close(self) -> None: ...
