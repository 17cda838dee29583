"""This rank's process: CPU utilisation and resident memory from psutil, on every host.

Read at step boundaries only (one /proc read each), so it needs no thread. CPU % is of one core:
a rank running two busy threads shows 200.
"""

from __future__ import annotations

import psutil


class ProcessMeter:
    def __init__(self) -> None:
        self.process = psutil.Process()
        self._cpu_s = self._cpu_time_s()

    def _cpu_time_s(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def restart(self) -> None:
        """Start the next window now (at the first step boundary)."""
        self._cpu_s = self._cpu_time_s()

    def window(self, wall_s: float) -> tuple[float, float]:
        """CPU % of one core over the window of `wall_s` just ended, and resident memory now (MB)."""
        now = self._cpu_time_s()
        used, self._cpu_s = now - self._cpu_s, now
        return (100.0 * used / wall_s if wall_s > 0 else 0.0), self.process.memory_info().rss / 2**20
