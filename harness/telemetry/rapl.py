"""CPU package and DRAM energy from Linux powercap (RAPL): /sys/class/powercap/intel-rapl:*.

Counted once per socket: each top-level `package-N` zone plus its `dram` subzone (DRAM energy
is not part of the package's). `core`/`uncore` subzones are already inside the package, and a
top-level `psys` zone covers the whole platform including the packages, so neither is added.
Counters are µJ and wrap at `max_energy_range_uj`; every read unwraps into a running total.
Since 2020 (CVE-2020-8694) `energy_uj` is readable by root only on most distributions: that is
reported as the reason, never read around. RAPL has no instant power, so power is the counter's
rate between reads. The zones are shared by every rank on the host, so only local rank 0 reads.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harness.telemetry.base import DeviceInfo, Reading, SourceUnavailable

DEFAULT_ROOT = Path("/sys/class/powercap")
_TOP = re.compile(r"^intel-rapl:\d+$")


@dataclass
class _Counter:
    path: Path
    fd: int
    """Kept open and re-read with pread: a fresh open per read costs more than the read itself."""
    max_uj: int
    last_uj: int
    total_uj: int = 0

    def read(self) -> float:
        """Joules since the source opened, unwrapping at most one wrap per read."""
        now = int(os.pread(self.fd, 32, 0))
        self.total_uj += now - self.last_uj if now >= self.last_uj else now + self.max_uj - self.last_uj
        self.last_uj = now
        return self.total_uj / 1e6


def _open(zone: Path) -> _Counter:
    energy = zone / "energy_uj"
    try:
        fd = os.open(energy, os.O_RDONLY)
        start = int(os.pread(fd, 32, 0))
    except PermissionError as exc:
        raise SourceUnavailable(f"{energy} is readable by root only (RAPL access is restricted since "
                                "CVE-2020-8694); run as root or grant read access to measure CPU energy") from exc
    except (OSError, ValueError) as exc:
        raise SourceUnavailable(f"{energy} is unreadable: {exc}") from exc
    return _Counter(energy, fd, int((zone / "max_energy_range_uj").read_text()), start)


class RaplSource:
    name = "rapl"
    boundary_reads = True
    independent_power = False
    min_interval_s = 0.0

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        packages = sorted(z for z in root.glob("intel-rapl:*") if _TOP.match(z.name)
                          and (z / "name").read_text().strip().startswith("package"))
        if not packages:
            raise SourceUnavailable(f"no RAPL package domains under {root} (no powercap driver, or not an "
                                    "x86 host)")
        self.sockets: list[list[_Counter]] = []
        self.devices: list[DeviceInfo] = []
        for zone in packages:
            counters = [_open(zone)]
            domains = [(zone / "name").read_text().strip()]
            for sub in sorted(zone.glob(f"{zone.name}:*")):
                if (sub / "name").read_text().strip() == "dram":
                    counters.append(_open(sub))
                    domains.append("dram")
            self.sockets.append(counters)
            self.devices.append(DeviceInfo(name=domains[0], notes=[f"domains: {' + '.join(domains)}"]))
        self._last: Optional[tuple[float, list[float]]] = None

    def read(self, boundary: bool = False) -> list[Reading]:
        now = time.perf_counter()
        energies = [sum(c.read() for c in counters) for counters in self.sockets]
        powers: list[Optional[float]] = [None] * len(energies)
        if self._last is not None and now > self._last[0]:
            powers = [(e - e0) / (now - self._last[0]) for e, e0 in zip(energies, self._last[1])]
        self._last = (now, energies)
        return [Reading(energy_j=e, power_w=p) for e, p in zip(energies, powers)]

    def close(self) -> None:
        for counters in self.sockets:
            for counter in counters:
                os.close(counter.fd)
