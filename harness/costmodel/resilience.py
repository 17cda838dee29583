"""Checkpoints and failures: what a job of a given length loses to saving its state and to restarts.

- Checkpoint size: the training state as the backend holds it — weights and optimizer state for every parameter
  (gradients are not saved), each shard written once: torch.distributed.checkpoint and DeepSpeed deduplicate
  data-parallel replicas.
- Write (read) time: size / min(the file system's aggregate write (read) bandwidth, the nodes' injection bandwidth:
  nodes × NICs × NIC bandwidth × efficiency), a synchronous save.
- Failures: exponential, at the job's mean time between failures M = node MTBF / nodes.
- The optimum interval between checkpoints τ: Daly's higher-order estimate (J. T. Daly, "A higher order estimate of
  the optimum checkpoint interval for restart dumps", Future Generation Computer Systems 22(3), 2006),
  τ = sqrt(2δM)·[1 + (1/3)·sqrt(δ/(2M)) + δ/(18M)] − δ for δ < 2M, else τ = M, δ the checkpoint time; its first
  term is Young's (J. W. Young, "A first order approximation to the optimum checkpoint interval", CACM 17(9), 1974).
- Expected wall time to do T_s of work with interval τ and restart time R (Daly 2006, the complete model):
  T_w = M·e^{R/M}·(e^{(τ+δ)/M} − 1)·T_s/τ; goodput = T_s / T_w, the fraction of wall time that made progress
  that survived. R = the checkpoint's read time + costmodel.restart_overhead_s.
"""

from __future__ import annotations

import math
from typing import Any, Optional

GB = 1e9


def daly_interval_s(delta_s: float, mtbf_s: float) -> float:
    """Daly's optimum compute time between checkpoints."""
    if delta_s >= 2 * mtbf_s:
        return mtbf_s
    return math.sqrt(2 * delta_s * mtbf_s) * (1 + math.sqrt(delta_s / (2 * mtbf_s)) / 3
                                              + delta_s / (18 * mtbf_s)) - delta_s


def goodput(interval_s: float, delta_s: float, restart_s: float, mtbf_s: float) -> float:
    """Useful work over expected wall time for checkpoints every `interval_s` of work (Daly 2006)."""
    wall_per_work = mtbf_s * math.exp(restart_s / mtbf_s) * math.expm1((interval_s + delta_s) / mtbf_s) / interval_s
    return 1.0 / wall_per_work


def checkpoint(cfg: Any, world: int, params: float, state_bytes_per_param: float, step_s: Optional[float]
               ) -> dict[str, Any]:
    """Size, write and read time of one checkpoint, the job's MTBF, the optimum interval and the goodput of a
    `costmodel.job_hours` job at `costmodel.checkpoint_every_steps` (0: the optimum); `reason` where the system
    does not say how fast its file system is."""
    system, knobs = cfg.system, cfg.costmodel
    size = params * state_bytes_per_param
    out: dict[str, Any] = {"bytes": size, "state_bytes_per_param": state_bytes_per_param}
    if not system.fs_write_bw_gb_per_s:
        out["reason"] = (f"system={system.name} states no fs_write_bw_gb_per_s (its file system's aggregate write "
                         "bandwidth): give system.fs_write_bw_gb_per_s=... for checkpoint time and goodput")
        return out
    nodes = max(1, math.ceil(world / int(system.devices_per_node)))
    injection = None
    if system.nics_per_node and system.nic_bw_gb_per_s:
        injection = nodes * system.nics_per_node * system.nic_bw_gb_per_s * (system.nic_efficiency or 1.0)
    write_bw = min(system.fs_write_bw_gb_per_s, injection or math.inf)
    read_bw = min(system.fs_read_bw_gb_per_s or system.fs_write_bw_gb_per_s, injection or math.inf)
    delta = size / (write_bw * GB)
    mtbf_s = system.node_mtbf_hours * 3600 / nodes
    restart = size / (read_bw * GB) + knobs.restart_overhead_s
    best = daly_interval_s(delta, mtbf_s)
    out.update(write_s=delta, read_s=size / (read_bw * GB), write_bw_gb_per_s=write_bw,
               limited_by="file system" if write_bw == system.fs_write_bw_gb_per_s else "node injection",
               source=system.fs_source, nodes=nodes, job_mtbf_hours=mtbf_s / 3600, restart_s=restart,
               optimal_interval_s=best, goodput_at_optimal=goodput(best, delta, restart, mtbf_s),
               job_hours=knobs.job_hours, expected_failures=knobs.job_hours * 3600 / mtbf_s)
    if step_s:
        out["optimal_interval_steps"] = max(1, round(best / step_s))
        every = knobs.checkpoint_every_steps or out["optimal_interval_steps"]
        out["interval_steps"] = every
        out["goodput"] = goodput(every * step_s, delta, restart, mtbf_s)
    return out
