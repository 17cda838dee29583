"""From per-rank readings to the job's numbers: steps.jsonl fields, summary metrics, telemetry block, power.csv.

Nothing here imports torch: `results.build_summary` uses it for failed jobs too.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

POWER_CSV = "power.csv"
NO_REPORT = "not measured: the job ended before its ranks reported telemetry"


def step_fields(table: Sequence[Sequence[float]], iter_time_s: float) -> dict[str, Optional[float]]:
    """One step over the whole job, from every rank's `StepReading.vector()` (one row per rank).

    energy_j is the sum over all devices on all nodes, or null if any rank's share is unmeasured
    (a partial sum would pass for the whole job); power_w is the mean per device.
    """
    devices = sum(row[1] for row in table)
    energies = [row[0] for row in table]
    energy_j = None if devices == 0 or any(math.isnan(e) for e in energies) else sum(energies)
    util_devices = sum(row[3] for row in table)
    return {
        "power_w": energy_j / iter_time_s / devices if energy_j is not None and iter_time_s > 0 else None,
        "energy_j": energy_j,
        "gpu_util_pct": sum(row[2] for row in table) / util_devices if util_devices else None,
        **_process_fields(table),
    }


def _process_fields(table: Sequence[Sequence[float]]) -> dict[str, Optional[float]]:
    """NaN where neither the sampler thread's intervals nor the step's own ends measured it."""
    cpu = [row[4] for row in table if not math.isnan(row[4])]
    rss = [row[5] for row in table if not math.isnan(row[5])]
    return {"process_cpu_pct": statistics.fmean(cpu) if cpu else None, "process_rss_mb": max(rss) if rss else None}


def timed_steps(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps a summary describes: not warm-up, and not run under the profiler (`profile.*`), whose
    start, recording and export change a step's time."""
    return [s for s in steps if not s.get("warmup") and not s.get("profiler")]


def energy_metrics(steps: list[dict[str, Any]], world_size: int) -> dict[str, Optional[float]]:
    """Summary metrics over the timed steps.

    Energy per step is the mean, not the median: a counter that moves every 100 ms puts a short
    step's energy in the next step, and only the sum over steps cancels that out. Power is
    time-weighted for the same reason, and TFLOP/s per watt is the job's model FLOPs over its
    energy (so it does not depend on how many devices a source counts: GPUs, GCDs or sockets).
    """
    timed = timed_steps(steps)
    measured = [s for s in timed if s.get("energy_j") is not None and s.get("power_w") is not None]
    out: dict[str, Optional[float]] = dict.fromkeys(
        ("power_w", "energy_j_per_step", "tokens_per_joule", "tflops_per_watt", "gpu_util_pct_mean",
         "gpu_util_pct_std", "process_cpu_pct", "process_rss_mb"))
    if measured and len(measured) == len(timed):
        seconds = sum(s["iter_time_ms"] for s in timed) / 1e3
        out["power_w"] = sum(s["power_w"] * s["iter_time_ms"] / 1e3 for s in timed) / seconds
        out["energy_j_per_step"] = statistics.fmean(s["energy_j"] for s in timed)
        tokens_per_step = timed[0]["tokens_per_s"] * timed[0]["iter_time_ms"] / 1e3
        out["tokens_per_joule"] = tokens_per_step / out["energy_j_per_step"] if out["energy_j_per_step"] else None
        tflop = sum(s["model_tflops_per_device"] * world_size * s["iter_time_ms"] / 1e3 for s in timed)
        energy_j = sum(s["energy_j"] for s in timed)
        out["tflops_per_watt"] = tflop / energy_j if energy_j else None
    utils = [s["gpu_util_pct"] for s in timed if s.get("gpu_util_pct") is not None]
    if utils:
        out["gpu_util_pct_mean"], out["gpu_util_pct_std"] = statistics.fmean(utils), statistics.pstdev(utils)
    cpu = [s["process_cpu_pct"] for s in timed if s.get("process_cpu_pct") is not None]
    if cpu:
        out["process_cpu_pct"] = statistics.fmean(cpu)
        out["process_rss_mb"] = max(s["process_rss_mb"] for s in timed if s.get("process_rss_mb") is not None)
    return out


def telemetry_block(reports: list[dict[str, Any]], power_csv: Optional[str]) -> dict[str, Any]:
    """What measured power on each device, or why nothing did; idle power per device."""
    devices = [{"host": r["host"], "rank": r["rank"], "source": r["source"], **d}
               for r in reports for d in r["devices"]]
    sources = sorted({r["source"] for r in reports if r["source"]})
    unmeasured = [r for r in reports if r["source"] is None and not r["shared_with_local_rank_0"]]
    reasons = sorted({f"rank {r['rank']} on {r['host']}: {r['reason']}" for r in unmeasured})
    idle = [d["idle_power_w"] for d in devices if d["idle_power_w"] is not None]
    busy = max((r["sampler_cpu_s"] / r["wall_s"] for r in reports if r["wall_s"] > 0), default=None)
    return {
        "source": ", ".join(sources) if sources else None,
        "reason": "; ".join(reasons) if reasons else None,
        "sampling": "per rank (each rank its own device; host RAPL domains on local rank 0)",
        "interval_ms": reports[0]["interval_ms"] if reports else None,
        "idle_s": reports[0]["idle_s"] if reports else None,
        "idle_power_w": statistics.fmean(idle) if idle else None,
        "devices": devices,
        "process": "psutil: process_cpu_pct (of one core, mean over ranks) and process_rss_mb (max over ranks)",
        "sampler_cpu_fraction_of_core": busy,
        "power_csv": power_csv,
        "host_load": host_load(reports),
    }


BUSY_OTHER_CORES = 0.25
"""Other processes using more than this share of a host's cores during a run make the host busy."""
BUSY_STEAL_PCT = 5.0
"""A hypervisor taking more than this share of the CPU (steal) makes the host busy."""


def host_load(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Per host: its cores, how many were busy during the run, how many of those the job's ranks used, and the
    rest: other processes' share (what makes a benchmark on a shared host measure its neighbours)."""
    hosts: dict[str, list[dict[str, Any]]] = {}
    for r in reports:
        if r.get("host_load") and r["host_load"].get("busy_cores") is not None:
            hosts.setdefault(r["host"], []).append(r["host_load"])
    out = {}
    for host, loads in hosts.items():
        busy = statistics.fmean(h["busy_cores"] for h in loads)
        own = sum(h["own_cpu_pct"] or 0.0 for h in loads) / 100
        steal = statistics.fmean(h["steal_pct"] or 0.0 for h in loads)
        out[host] = {"cores": loads[0]["cores"], "busy_cores": busy, "job_cores": own,
                     "other_cores": max(0.0, busy - own), "steal_pct": steal,
                     "load1_max": max(h["load1_max"] for h in loads), "ranks": len(loads)}
        others = gpu_co_tenants([r for r in reports if r.get("host") == host])
        if others:
            out[host]["gpu_other_processes"] = others
    return out


def gpu_co_tenants(reports: list[dict[str, Any]]) -> dict[str, int]:
    """Per device of one host, how many processes other than the job's ranks computed on it (NVML's list at
    the run's end). Where none of the ranks' pids is in the list (a container's PID namespace), the count
    beyond the ranks that use the device."""
    pids = {r["pid"] for r in reports if r.get("pid") is not None}
    seen: dict[str, set[int]] = {}
    users: dict[str, int] = {}
    for r in reports:
        for device, listed in (r.get("device_processes") or {}).items():
            if listed is not None:
                seen.setdefault(device, set()).update(listed)
                users[device] = users.get(device, 0) + 1
    counts = {device: len(listed - pids) if listed & pids else len(listed) - users[device]
              for device, listed in seen.items()}
    return {device: count for device, count in counts.items() if count > 0}


def busy_host_warnings(during: dict[str, Any], before: Optional[dict[str, Any]]) -> list[str]:
    """One line per host that other work shared during the run (or just before it)."""
    out = []
    for host, h in during.items():
        if h["other_cores"] > BUSY_OTHER_CORES * h["cores"] or h["steal_pct"] > BUSY_STEAL_PCT:
            out.append(f"host {host} was busy: other processes used {h['other_cores']:.1f} of its {h['cores']} cores "
                       f"during the run (steal {h['steal_pct']:.0f}%, load average up to {h['load1_max']:.1f}): "
                       "the timings include their interference")
    for host, h in during.items():
        for device, count in (h.get("gpu_other_processes") or {}).items():
            out.append(f"{device} on {host} was shared: {count} other process(es) computed on it during the run "
                       "(nvidia-smi lists them): the timings include their work")
    if before and before.get("busy_cores") is not None and before["busy_cores"] > BUSY_OTHER_CORES * before["cores"]:
        out.append(f"{before['busy_cores']:.1f} of {before['cores']} cores were busy just before the run started")
    return out


def write_power_csv(run_dir: Path, reports: list[dict[str, Any]]) -> Optional[str]:
    """The sampled trace of every device of every rank, for plots; None when nothing was sampled."""
    rows = sorted(((s[0], r["host"], *s[1:]) for r in reports for s in r["samples"]), key=lambda s: s[0])
    if not rows:
        return None
    with open(run_dir / POWER_CSV, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["time_unix_s", "host", "device", "power_w", "energy_j", "util_pct", "memory_mb"])
        for s in rows:
            writer.writerow([f"{s[0]:.3f}", *("" if v is None else v for v in s[1:])])
    return POWER_CSV
