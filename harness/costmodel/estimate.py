"""One prediction for one config: what `harness estimate` prints and what every run stores as `prediction`.

Values the model cannot give (no peak for the device, a bandwidth the system profile lacks, no power
figures) are `None` with a `*_reason` next to them, as measured values are.
"""

from __future__ import annotations

from typing import Any, Optional

from harness.core.layout import Layout
from harness.core.registry import pipeline_bubble
from harness.costmodel.comm import bytes_by_dim, collectives
from harness.costmodel.flops import param_count, step_flops
from harness.costmodel.layout import job_from_config
from harness.costmodel.memory import GB, memory_per_device, memory_verdict
from harness.costmodel.peaks import PeakLookup, lookup_peak
from harness.costmodel.reach import reach_warnings
from harness.costmodel.resilience import checkpoint
from harness.costmodel.software import Software
from harness.costmodel.timing import StepTime, alcf_fom, hardware, power_w, step_time
from harness.costmodel.track_record import not_applicable, track_record
from harness.costmodel.whatif import time_by_resource, what_if

SECONDS_PER_DAY = 86400.0


def system_peak(system: Any, precision: str) -> PeakLookup:
    """A measured peak from the profile wins; else the peak table by the profile's accelerator."""
    if system.peak_tflops is not None:
        return PeakLookup(float(system.peak_tflops), system.peak_tflops_source, None)
    if getattr(system, "accelerator", None):
        return lookup_peak(system.accelerator, precision)
    return PeakLookup(None, None, f"system={system.name} names no accelerator and no measured peak_tflops; "
                      "run `harness calibrate` or give system.peak_tflops and system.peak_tflops_source")


def estimate(cfg: Any, layout: Layout, *, software: Optional[Software] = None,
             train_tokens: Optional[float] = None) -> dict[str, Any]:
    """The cost model's answer for `cfg` on `layout` (already validated), under `software` (default: the profile
    `cfg` selects, costmodel.software)."""
    job = job_from_config(cfg, layout, software)
    system, m = cfg.system, cfg.model
    flops = step_flops(m, layout.global_batch_size, job.checkpointing, job.checkpoint_every_n,
                       early_stop=job.software.recompute_early_stop)
    memory = memory_per_device(job, system.framework_overhead_gb * GB)
    colls = collectives(job)
    out: dict[str, Any] = {
        "system": system.name,
        "software": job.software.describe(),
        "params": param_count(m),
        "params_per_device": job.params_per_rank,
        "flops_per_step": {"model": flops.model, "hardware": flops.hardware},
        "memory_per_device_bytes": memory,
        "device_memory_bytes": system.memory_gb * GB if system.memory_gb is not None else None,
        "comm_bytes_per_device": bytes_by_dim(colls),
        "collectives": [dict(dim=c.dim, kind=c.kind, payload_bytes=c.payload_bytes, calls=c.calls, units=c.units,
                             group=c.group, local=c.local, intra_node=c.intra_node, wire_bytes=c.wire_bytes)
                        for c in colls],
        "pp_schedule": job.pp_schedule if layout.pp > 1 else None,
        "bubble_fraction": pipeline_bubble(job.pp_schedule, layout.pp, job.vpp, job.micro_batches),
        "track_record": track_record(system, job.software.name),
    }
    if out["track_record"] is None:
        out["track_record_reason"] = not_applicable(system)
    out["fits"] = None if out["device_memory_bytes"] is None else memory["total"] <= out["device_memory_bytes"]
    out["memory_verdict"] = memory_verdict(memory["total"], out["device_memory_bytes"])
    if out["fits"] is None:
        out["fits_reason"] = f"system={system.name} states no memory_gb"
    peak = system_peak(system, job.precision)
    out["peak_tflops"], out["peak_tflops_source"] = peak.tflops, peak.source
    local = min(layout.world_size, int(system.devices_per_node))
    hw = hardware(system, peak.tflops, local) if peak.tflops else None
    timed = step_time(job, colls, hw) if hw is not None else peak.reason
    _add_rates(out, cfg, layout, flops, timed, peak, train_tokens)
    if hw is not None and isinstance(timed, StepTime):
        out["time_by_resource_s"] = time_by_resource(job, hw, timed)
        out["what_if"] = what_if(job, colls, hw, timed.step_s)
    state = job.state_bytes
    out["checkpoint"] = checkpoint(cfg, layout.world_size, out["params"], state.weights + state.optimizer,
                                   out.get("step_time_s"))
    out["reach_warnings"] = reach_warnings(cfg, layout.world_size)
    return out


TIMED_KEYS = ("step_time_s", "iter_time_ms", "tokens_per_s", "tflops_per_device", "mfu", "hfu",
              "energy_j_per_step", "power_w", "fom", "projection", "linear_scaling_bw_gb_per_s")


def _add_rates(out: dict[str, Any], cfg: Any, layout: Layout, flops: Any, timed: Any, peak: PeakLookup,
               train_tokens: Optional[float]) -> None:
    if isinstance(timed, str):
        for key in TIMED_KEYS:
            out[key], out[f"{key}_reason"] = None, timed
        return
    step_s, world = timed.step_s, layout.world_size
    tokens = layout.global_batch_size * cfg.model.seq_len
    model_tflops = flops.model / step_s / world / 1e12
    hw = hardware(cfg.system, peak.tflops, min(layout.world_size, int(cfg.system.devices_per_node)))  # type: ignore[arg-type]
    busy = timed.compute_s / step_s
    power = power_w(busy, hw)
    out.update(
        step_time_s=step_s,
        iter_time_ms=step_s * 1e3,
        breakdown_s={"compute": timed.compute_s, "bubble": timed.compute_s * timed.bubble_fraction,
                     "exposed_comm": timed.exposed_comm_s, "comm": timed.comm_s, **timed.memory_bound_s},
        tokens_per_s=tokens / step_s,
        tflops_per_device={"model": model_tflops, "hardware": flops.hardware / step_s / world / 1e12},
        mfu=model_tflops / peak.tflops,  # type: ignore[operator]
        hfu=flops.hardware / step_s / world / 1e12 / peak.tflops,  # type: ignore[operator]
        power_w=power,
        energy_j_per_step=None if power is None else power * step_s * world,
        fom=alcf_fom(cfg.model, layout.global_batch_size, step_s),
        linear_scaling_bw_gb_per_s=out["comm_bytes_per_device"]["total"] / timed.compute_s / 1e9,
    )
    if power is None:
        out["power_w_reason"] = out["energy_j_per_step_reason"] = (
            f"system={cfg.system.name} states no idle_power_w/peak_power_w")
    train_tokens = train_tokens if train_tokens is not None else 20 * out["params"]
    train_flops = flops.model / tokens * train_tokens
    train_s = train_flops / (model_tflops * 1e12 * world)
    out["projection"] = {
        "train_tokens": train_tokens,
        "train_flops": train_flops,
        "train_days": train_s / SECONDS_PER_DAY,
        "train_energy_j": None if power is None else power * world * train_s,
        "devices": world,
    }


def predicted_metrics(est: dict[str, Any]) -> dict[str, Any]:
    """The estimate under the keys of a run's measured `metrics`, with the full estimate under `estimate`."""
    tflops = est["tflops_per_device"] or {}
    out: dict[str, Any] = {
        "iter_time_ms": est["iter_time_ms"],
        "tokens_per_s": est["tokens_per_s"],
        "model_tflops_per_device": tflops.get("model"),
        "hardware_tflops_per_device": tflops.get("hardware"),
        "mfu": est["mfu"],
        "hfu": est["hfu"],
        "peak_memory_mb": est["memory_per_device_bytes"]["total"] / 2**20,
        "power_w": est["power_w"],
        "energy_j_per_step": est["energy_j_per_step"],
        "tokens_per_joule": (est["tokens_per_s"] * est["step_time_s"] / est["energy_j_per_step"]
                             if est["energy_j_per_step"] else None),
        "comm_bytes_per_device": est["comm_bytes_per_device"]["total"],
    }
    for key in ("iter_time_ms", "tokens_per_s", "mfu", "power_w", "energy_j_per_step"):
        if out[key] is None and est.get(f"{key}_reason"):
            out[f"{key}_reason"] = est[f"{key}_reason"]
    out["estimate"] = est
    return out
