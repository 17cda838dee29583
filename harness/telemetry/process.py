"""This rank's process: CPU utilisation and resident memory from psutil, on every host.

Sampled by the telemetry thread, not at step boundaries: two /proc reads cost ~30 µs, a tenth of
a percent of a 20 ms step if paid every step, nothing measurable at 10 Hz. CPU % is of one core
over the latest sampling interval: a rank running two busy threads shows 200. Only the steps that end
before the thread's first interval are measured at their own two ends (ProcessMeter.since).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Optional

import psutil


class ProcessMeter:
    def __init__(self) -> None:
        self.process = psutil.Process()
        self._last: Optional[tuple[float, float]] = None
        self.cpu_pct = math.nan
        self.rss_mb = math.nan

    def sample(self) -> None:
        reading = self.read()
        if self._last is not None:
            self.cpu_pct = _cpu_pct(self._last, reading, self.cpu_pct)
        self._last = reading
        self.rss_mb = self.process.memory_info().rss / 2**20

    def read(self) -> tuple[float, float]:
        """(now, this process's CPU seconds so far)."""
        times = self.process.cpu_times()
        return time.perf_counter(), times.user + times.system

    def since(self, then: tuple[float, float]) -> tuple[float, float]:
        """(CPU % of one core since `then`, a `read()`; resident MB now): a step measured at its own ends, for the
        steps that finish before the thread's first interval."""
        return _cpu_pct(then, self.read(), math.nan), self.process.memory_info().rss / 2**20


def _cpu_pct(then: tuple[float, float], now: tuple[float, float], otherwise: float) -> float:
    """CPU % of one core between two `ProcessMeter.read()`s; `otherwise` where no time passed between them."""
    return 100.0 * (now[1] - then[1]) / (now[0] - then[0]) if now[0] > then[0] else otherwise


class HostMeter:
    """The whole host's CPU while a job runs: how many cores were busy (all processes), the share the
    hypervisor took (steal), and the load average. Beside the job's own processes' CPU this says how much other
    work shared the host: a benchmark on a busy host measures the neighbours too."""

    def __init__(self) -> None:
        self.cores = psutil.cpu_count() or 1
        self._last = psutil.cpu_times()
        self._busy: list[float] = []
        self._steal: list[float] = []
        self._load1 = 0.0
        self.own_cpu: list[float] = []

    def sample(self, own_cpu_pct: float = math.nan) -> None:
        now = psutil.cpu_times()
        total = sum(now) - sum(self._last)
        if total > 0:
            idle = (now.idle - self._last.idle) + (getattr(now, "iowait", 0.0) - getattr(self._last, "iowait", 0.0))
            steal = getattr(now, "steal", 0.0) - getattr(self._last, "steal", 0.0)
            self._busy.append(self.cores * (total - idle - steal) / total)
            self._steal.append(100.0 * steal / total)
        self._last = now
        self._load1 = max(self._load1, os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
        if not math.isnan(own_cpu_pct):
            self.own_cpu.append(own_cpu_pct)

    def report(self) -> dict[str, Any]:
        """Means over the samples taken (None where none were)."""
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        return {"cores": self.cores, "busy_cores": mean(self._busy), "steal_pct": mean(self._steal),
                "load1_max": self._load1, "samples": len(self._busy), "own_cpu_pct": mean(self.own_cpu)}


def host_load_now(seconds: float = 0.3) -> dict[str, Any]:
    """The host's CPU over `seconds` now (before a run starts its ranks)."""
    meter = HostMeter()
    time.sleep(seconds)
    meter.sample()
    return meter.report()
