"""The background sampler: per-step energy windows, idle power, and the trace for power.csv.

Sampling is per rank, each rank measuring only its own device(s). Why not one sampler per node:
each rank's device is identified exactly from its own torch device (UUID/PCI), with no gathering
of the node's device list first; each window closes right after that rank's own device
synchronisation, the only point where its device's work for the step is known to be done; the
per-step energy then rides on the collective the step record already makes (Trainer.reduce);
and an NVML/amdsmi read costs tens of µs, so N threads at 10 Hz on a node stay far below 1% of a
core. Shared host domains (RAPL packages) are the exception: local rank 0 reads them for all.

Energy per window comes from the hardware counter where it passed a Zeus-style check during the
idle window (counter energy within 0.1x-10x of integrated power x time; Zeus uses the same loose
bounds to catch counters that are plainly broken), and from trapezoidal integration of the
sampled power otherwise. Sources cheap enough are also read synchronously at each boundary, so a
window's ends are exact readings rather than the nearest sample; utilisation, memory and the
process (psutil) are left to the thread, which also runs without a power source.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from harness.telemetry.base import Source
from harness.telemetry.process import HostMeter, ProcessMeter

CHECK_LOW, CHECK_HIGH = 0.1, 10.0
"""Counter/integrated-power ratios outside these bounds mark the counter broken (Zeus's bounds)."""


@dataclass
class StepReading:
    """This rank's share of one step, packed into the step's all_gather as floats (NaN = unmeasured)."""

    energy_j: float
    devices: int
    util_sum: float
    util_devices: int
    process_cpu_pct: float
    process_rss_mb: float

    def vector(self) -> list[float]:
        return [self.energy_j, float(self.devices), self.util_sum, float(self.util_devices),
                self.process_cpu_pct, self.process_rss_mb]


class Sampler:
    def __init__(self, source: Optional[Source], *, reason: Optional[str], shared: bool, interval_s: float,
                 idle_s: float, warmup_steps: int, host: str, rank: int) -> None:
        self.source, self.reason, self.shared = source, reason, shared
        self.interval_s = max(interval_s, source.min_interval_s if source else 0.0)
        self.idle_s, self.warmup_steps, self.host, self.rank = idle_s, warmup_steps, host, rank
        self.process = ProcessMeter()
        self.host_meter = HostMeter()
        n = len(source.devices) if source else 0
        self._counter0: list[Optional[float]] = [None] * n
        self._counter: list[Optional[float]] = [None] * n
        self._integrated: list[Optional[float]] = [None] * n
        self._power: list[Optional[float]] = [None] * n
        self._power_t: list[float] = [0.0] * n
        self._util: list[Optional[float]] = [None] * n
        self.rows: list[tuple[float, int, Optional[float], Optional[float], Optional[float], Optional[float]]] = []
        self.methods = ["none"] * n
        self.idle_power_w: list[Optional[float]] = [None] * n
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._thread_cpu_s = 0.0
        self._started_at = 0.0
        self._boundaries = 0
        self._prev: Optional[tuple[float, list[tuple[Optional[float], Optional[float]]], int]] = None
        self._step_cpu: Optional[tuple[float, float]] = None  # the process at the last boundary, until the thread
        # has measured an interval of its own
        self._timed_start: Optional[list[tuple[Optional[float], Optional[float]]]] = None
        self._unix_offset = time.time() - time.perf_counter()
        self._report: Optional[dict[str, Any]] = None

    # -- sampling -------------------------------------------------------------------------------
    def _sample(self, boundary: bool = False) -> None:
        """Read every device once and advance each running power integral; the thread's samples are kept."""
        assert self.source is not None
        with self._lock:
            readings = self.source.read(boundary)
            t = time.perf_counter()
            for k, r in enumerate(readings):
                if r.energy_j is not None:
                    if self._counter0[k] is None:
                        self._counter0[k] = r.energy_j
                    self._counter[k] = r.energy_j - self._counter0[k]  # type: ignore[operator]
                if r.power_w is not None:
                    if self._power[k] is None:
                        self._integrated[k] = 0.0
                    else:
                        self._integrated[k] += (r.power_w + self._power[k]) / 2 * (t - self._power_t[k])  # type: ignore[operator]
                    self._power[k], self._power_t[k] = r.power_w, t
                if r.util_pct is not None:
                    self._util[k] = r.util_pct
                if not boundary:
                    self.rows.append((t, k, r.power_w, self._counter[k], r.util_pct, r.memory_mb))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.process.sample()
            self.host_meter.sample(self.process.cpu_pct)
            if self.source is not None:
                self._sample()
        self._thread_cpu_s = time.thread_time()  # this thread's own CPU time, robust to busy neighbours

    def _values_at(self, t: float) -> list[tuple[Optional[float], Optional[float]]]:
        """(counter J, integrated J) per device at time t, holding the last power past the last sample."""
        with self._lock:
            out = []
            for k in range(len(self.methods)):
                integrated = self._integrated[k]
                if integrated is not None and self._power[k] is not None:
                    integrated += self._power[k] * max(0.0, t - self._power_t[k])  # type: ignore[operator]
                out.append((self._counter[k], integrated))
            return out

    def _read_boundary(self, t: float) -> list[tuple[Optional[float], Optional[float]]]:
        if self.source is not None and self.source.boundary_reads:
            self._sample(boundary=True)
        return self._values_at(t)

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread and measure idle power for `idle_s` (before the first step)."""
        self._started_at = time.perf_counter()
        self.process.sample()
        if self.source is not None:
            self._sample()
        self._thread = threading.Thread(target=self._run, name="harness-telemetry", daemon=True)
        self._thread.start()
        if self.source is None:
            return
        idle: list[tuple[Optional[float], Optional[float]]] = [(None, None)] * len(self.methods)
        if self.idle_s > 0:
            if self.rank == 0:
                from harness.core.console import say

                say(f"measuring idle power for {self.idle_s:g} s before the first step (telemetry.idle_s)")
            t0 = time.perf_counter()
            v0 = self._read_boundary(t0)
            time.sleep(self.idle_s)
            t1 = time.perf_counter()
            v1 = self._read_boundary(t1)
            idle = [(_delta(a[0], b[0]), _delta(a[1], b[1])) for a, b in zip(v0, v1)]
            self._choose_methods(idle)
            for k, method in enumerate(self.methods):
                energy = _pick(method, idle[k])
                self.idle_power_w[k] = None if energy is None else energy / (t1 - t0)
        else:
            self._choose_methods(idle)

    def _choose_methods(self, idle: list[tuple[Optional[float], Optional[float]]]) -> None:
        assert self.source is not None
        for k, info in enumerate(self.source.devices):
            counter, integrated = idle[k]
            has_counter, has_power = self._counter[k] is not None, self._power[k] is not None
            if info.reports_nothing:
                self.methods[k] = "attributed"
            elif has_counter and has_power and self.source.independent_power and self.idle_s > 0:
                if integrated is None or integrated < 1e-3:
                    self.methods[k] = "counter"
                    info.notes.append("energy counter unchecked: power read ~0 W during the idle window")
                elif CHECK_LOW < (counter or 0.0) / integrated < CHECK_HIGH:
                    self.methods[k] = "counter"
                else:
                    self.methods[k] = "integration"
                    info.notes.append(f"energy counter rejected: {counter or 0.0:.3f} J against {integrated:.3f} J "
                                      "of integrated power over the idle window; integrating power instead")
            elif has_counter:
                self.methods[k] = "counter"
                if has_power and self.source.independent_power:
                    info.notes.append("energy counter unchecked (telemetry.idle_s=0)")
            elif has_power:
                self.methods[k] = "integration"
            else:
                info.notes.append("reports neither an energy counter nor power")

    def mark_step(self, t: float) -> Optional[StepReading]:
        """Call right after the device synchronisation that ends a step (and once before the first)."""
        values = self._read_boundary(t)
        prev, self._prev = self._prev, (t, values, len(self.rows))
        if self._boundaries == self.warmup_steps:
            self._timed_start = values
        self._boundaries += 1
        cpu_pct, rss_mb = self.process.cpu_pct, self.process.rss_mb  # the thread's latest interval
        if math.isnan(cpu_pct) and self._step_cpu is not None:  # none yet: this step, measured at its two ends
            cpu_pct, rss_mb = self.process.since(self._step_cpu)
        self._step_cpu = self.process.read() if math.isnan(self.process.cpu_pct) else None
        if prev is None:
            return None
        if self.source is None:
            return StepReading(0.0 if self.shared else math.nan, 0, 0.0, 0, cpu_pct, rss_mb)
        energies = [_pick(m, (_delta(a[0], b[0]), _delta(a[1], b[1])))
                    for m, a, b in zip(self.methods, prev[1], values)]
        utils = self._window_utils(prev[2])
        return StepReading(
            energy_j=math.nan if any(e is None for e in energies) else sum(energies),  # type: ignore[misc]
            devices=len(energies),
            util_sum=sum(u for u in utils if u is not None),
            util_devices=sum(u is not None for u in utils),
            process_cpu_pct=cpu_pct, process_rss_mb=rss_mb,
        )

    def _window_utils(self, first_row: int) -> list[Optional[float]]:
        """Mean utilisation of each device's samples in the window; the latest one if none fell in it."""
        with self._lock:
            rows, latest = self.rows[first_row:], list(self._util)
        out = []
        for k, last in enumerate(latest):
            values = [r[4] for r in rows if r[1] == k and r[4] is not None]
            out.append(sum(values) / len(values) if values else last)
        return out

    def stop(self) -> dict[str, Any]:
        """Stop the thread and report what this rank measured, for the summary and power.csv (once)."""
        if self._report is None:
            self._report = self._stop_and_report()
        return self._report

    def _stop_and_report(self) -> dict[str, Any]:
        wall_s = time.perf_counter() - self._started_at if self._started_at else 0.0
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        report: dict[str, Any] = {
            "rank": self.rank, "host": self.host, "source": self.source.name if self.source else None,
            "reason": self.reason, "shared_with_local_rank_0": self.shared,
            "interval_ms": self.interval_s * 1e3, "idle_s": self.idle_s,
            "sampler_cpu_s": self._thread_cpu_s, "wall_s": wall_s, "devices": [], "samples": [],
            "host_load": self.host_meter.report(),
        }
        if self.source is None:
            return report
        end = self._prev[1] if self._prev else None
        for k, info in enumerate(self.source.devices):
            counter = integrated = None
            if self._timed_start is not None and end is not None:
                counter = _delta(self._timed_start[k][0], end[k][0])
                integrated = _delta(self._timed_start[k][1], end[k][1])
            report["devices"].append({
                "device": info.name, "energy_method": self.methods[k], "notes": info.notes,
                "idle_power_w": self.idle_power_w[k],
                "timed_counter_energy_j": counter, "timed_integrated_energy_j": integrated,
                "counter_over_integrated": counter / integrated if counter is not None and integrated else None,
            })
        names = [d.name for d in self.source.devices]
        report["samples"] = [(t + self._unix_offset, names[k], p, e, u, m) for t, k, p, e, u, m in self.rows]
        processes = getattr(self.source, "processes", None)  # NVML says who else computes on the device
        if processes is not None:
            report["pid"] = os.getpid()
            report["device_processes"] = dict(zip(names, processes()))
        self.source.close()
        return report


def _delta(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else b - a


def _pick(method: str, energies: tuple[Optional[float], Optional[float]]) -> Optional[float]:
    """The window's energy by the device's method from (counter, integrated); an attributed die draws 0."""
    return {"counter": energies[0], "integration": energies[1], "attributed": 0.0}.get(method)
