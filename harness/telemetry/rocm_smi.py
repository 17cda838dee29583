"""AMD GPUs through the `rocm-smi --json` command, where the amdsmi Python package is missing.

One call costs a process start (hundreds of ms), so this source is sampled at most once a second
and never synchronously at step boundaries: step windows use the latest sample. Keys (rocm-smi
5.x/6.x): "PCI Bus", "Accumulated Energy (uJ)", "Current Socket Graphics Package Power (W)"
(MI300) or "Average Graphics Package Power (W)", "GPU use (%)"; values are strings, "N/A" when
unsupported. VRAM is reported only as a percentage, so memory_mb stays unmeasured.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any, Callable, Optional

from harness.telemetry.base import DeviceId, DeviceInfo, Reading, SourceUnavailable

COMMAND = ["rocm-smi", "--showbus", "--showpower", "--showuse", "--showenergycounter", "--json"]
POWER_KEYS = ("Current Socket Graphics Package Power (W)", "Average Graphics Package Power (W)")


def _number(value: Any) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def run_rocm_smi() -> dict[str, Any]:
    out = subprocess.run(COMMAND, capture_output=True, text=True, timeout=30, check=True).stdout
    return json.loads(out)


class RocmSmiSource:
    name = "rocm-smi"
    boundary_reads = False
    independent_power = True
    min_interval_s = 1.0

    def __init__(self, ids: list[DeviceId], query: Callable[[], dict[str, Any]] = run_rocm_smi) -> None:
        if query is run_rocm_smi and shutil.which("rocm-smi") is None:
            raise SourceUnavailable("rocm-smi is not on PATH")
        self.query = query
        try:
            cards = query()
        except (OSError, subprocess.SubprocessError, json.JSONDecodeError) as exc:
            raise SourceUnavailable(f"rocm-smi --json failed: {exc}") from exc
        by_bus = {str(c.get("PCI Bus", "")).lower(): card for card, c in cards.items() if card.startswith("card")}
        self.cards = []
        for device_id in ids:
            card = by_bus.get((device_id.pci_bus_id or "").lower())
            if card is None:
                raise SourceUnavailable(f"{device_id.label} (BDF {device_id.pci_bus_id}) not in rocm-smi's cards")
            self.cards.append(card)
        self.devices = [DeviceInfo(name=(i.pci_bus_id or i.label)) for i in ids]
        first = self._parse(cards)
        for info, reading in zip(self.devices, first):
            if reading.power_w is None and reading.energy_j is None:
                info.reports_nothing = True  # MI250X secondary GCD: "N/A"/0, its OAM is on the primary
                info.notes.append("reports no power or energy (MI250X secondary GCD: counted on the primary)")
            info.notes.append("memory_mb: rocm-smi reports VRAM only as a percentage")

    def _parse(self, cards: dict[str, Any]) -> list[Reading]:
        out = []
        for card in self.cards:
            c = cards.get(card, {})
            power = next((_number(c.get(k)) for k in POWER_KEYS if _number(c.get(k))), None)
            energy_uj = _number(c.get("Accumulated Energy (uJ)"))
            out.append(Reading(energy_j=None if not energy_uj else energy_uj / 1e6, power_w=power,
                               util_pct=_number(c.get("GPU use (%)"))))
        return out

    def read(self, boundary: bool = False) -> list[Reading]:
        try:
            return self._parse(self.query())
        except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
            return [Reading() for _ in self.cards]

    def close(self) -> None:
        pass
