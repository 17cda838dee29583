"""`harness estimate`: compose a config from Hydra overrides, validate it as `run` would, print the cost model.

Nothing here imports torch, so an estimate of a trillion-parameter layout answers in well under 2 s.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

from harness.config.compose import HelpRequested, compose, split_command_args
from harness.core.errors import ConfigError
from harness.core.layout import Layout, cp_text
from harness.costmodel.memory import GB, REFUSE_ABOVE
from harness.run.preflight import check_config

MEMORY_KEYS = ("weights", "grads", "optimizer", "activations", "buffers", "overhead", "total")


def planned_world_size(cfg: Any) -> int:
    """`parallel.world_size` when given, else the ranks `run` would start locally."""
    if cfg.parallel.world_size is not None:
        if cfg.parallel.world_size < 1:
            raise ConfigError(f"parallel.world_size={cfg.parallel.world_size}: must be at least 1 (devices in the job)")
        return cfg.parallel.world_size
    if cfg.launcher.nproc < 1:
        raise ConfigError(f"launcher.nproc={cfg.launcher.nproc}: must be at least 1; or give parallel.world_size")
    return cfg.launcher.nproc


def _fmt_bytes(value: float | None) -> str:
    return "n/a" if value is None else f"{value / GB:,.2f} GB"


def _num(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_estimate(cfg: Any, layout: Layout, est: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"{cfg.model.name} ({est['params']:,} params) · {cfg.backend.name} · system {est['system']} · "
             f"world {layout.world_size} (dp {layout.dp}, tp {layout.tp}, pp {layout.pp}{cp_text(layout.cp)}, "
             f"zero {layout.zero_stage})"
             f" · batch {layout.global_batch_size} = {layout.micro_batch_size} x {layout.dp} x {layout.grad_accum}")
    table = Table(title=title, title_justify="left")
    for column in ("quantity", "predicted", "note"):
        table.add_column(column, justify="right" if column == "predicted" else "left")
    mem, device = est["memory_per_device_bytes"], est["device_memory_bytes"]
    for key in MEMORY_KEYS:
        table.add_row(f"memory: {key}", _fmt_bytes(mem[key]), "per device, busiest rank")
    verdict = est.get("memory_verdict")
    fits = {"fits": "fits", "tight": f"MAY NOT FIT (within {REFUSE_ABOVE:g}× of the device: run warns)",
            "too big": "DOES NOT FIT", None: est.get("fits_reason", "")}[verdict]
    table.add_row("device memory", _fmt_bytes(device), fits)
    comm = est["comm_bytes_per_device"]
    table.add_row("communication", _fmt_bytes(comm["total"]),
                  f"per device per step: dp {_fmt_bytes(comm['dp'])}, tp {_fmt_bytes(comm['tp'])}, "
                  f"pp {_fmt_bytes(comm['pp'])}" + (f", cp {_fmt_bytes(comm['cp'])}" if layout.cp > 1 else ""))
    table.add_row("model / hardware FLOPs per step",
                  f"{est['flops_per_step']['model']:.4g} / {est['flops_per_step']['hardware']:.4g}", "all devices")
    table.add_row("pipeline bubble", f"{est['bubble_fraction']:.1%}",
                  f"{est['pp_schedule']} schedule (core/registry.py PipelineSchedule.bubble)" if est["pp_schedule"]
                  else "no pipeline")
    reason = est.get("step_time_s_reason", "")
    tf = est["tflops_per_device"] or {}
    rows = [
        ("step time", _num(est["step_time_s"], ".4g") + " s", reason),
        ("tokens/s", _num(est["tokens_per_s"], ",.0f"), ""),
        ("model TFLOP/s per device", _num(tf.get("model"), ".4g"), f"peak {est['peak_tflops']}"),
        ("MFU / HFU", f"{_num(est['mfu'], '.1%')} / {_num(est['hfu'], '.1%')}", ""),
        ("energy per step", _num(est["energy_j_per_step"], ",.0f") + " J", est.get("energy_j_per_step_reason", "")),
        ("ALCF FOM", _num(est["fom"], ".4g"), "(6sd²+s²d)·b·L / T_step"),
        ("bandwidth for linear scaling", _num(est["linear_scaling_bw_gb_per_s"], ".3g") + " GB/s",
         "comm per step / compute time"),
    ]
    projection = est.get("projection")
    if projection:
        rows.append(("train 20 tokens/param", f"{projection['train_days']:.4g} days",
                     f"{projection['train_flops']:.3g} FLOPs, energy {_num(projection['train_energy_j'], '.3g')} J"))
    rows += checkpoint_rows(est["checkpoint"])
    rows += track_record_rows(est["track_record"], est["system"], est.get("track_record_reason"))
    for row in rows:
        table.add_row(*row)
    Console().print(table)


TRACK_KIND = {"step time": ("speed", "faster"), "memory": ("memory", "more"), "collective": ("bus bandwidth", "faster"),
              "scaling": ("scaling", "to keep more of its per-device speed")}
"""What a published table scores, as the row names it, and what its + means (predicted ... than published)."""


def track_record_rows(record: Optional[list[dict[str, Any]]], system: str,
                      reason: Optional[str] = None) -> list[tuple[str, str, str]]:
    """How the model scored on published runs of this system or accelerator (costmodel/track_record.py): the range of
    predicted-over-published errors per table, + where the prediction was faster (or larger) than measured."""
    if record is None:
        return [("track record", "n/a", reason or "")]
    if not record:
        return [("track record", "none", f"no published run on system={system} or its accelerator is scored "
                 "(harness/costmodel/published_runs.yaml): this prediction is unchecked there")]
    rows = []
    for t in record:
        low, high = (f"{v:+.0%}" if round(v, 2) else "0%" for v in (t["low"], t["high"]))
        what, plus = TRACK_KIND[t["scores"]]
        rows.append((f"track record: {what}", low if low == high else f"{low} to {high}",
                     f"+: predicted {plus} than published, {t['label']} ({t['rows']} run{'s' * (t['rows'] != 1)}, "
                     f"{t['software']}; same {t['match']}"
                     f"{'; partly in sample: an input came from its source' if t.get('in_sample') else ''})"))
    return rows


def checkpoint_rows(ckpt: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Checkpoint size and time, the job's failures and its goodput (costmodel/resilience.py)."""
    size = ("checkpoint", _fmt_bytes(ckpt["bytes"]), f"weights + optimizer state, {ckpt['state_bytes_per_param']:g} "
            "B/param, each shard once")
    if "reason" in ckpt:
        return [(size[0], size[1], ckpt["reason"])]
    rows = [(size[0], size[1], f"write {ckpt['write_s']:.3g} s, read {ckpt['read_s']:.3g} s at "
             f"{ckpt['write_bw_gb_per_s']:,.0f} GB/s ({ckpt['limited_by']})"),
            ("failures", f"{ckpt['expected_failures']:.3g}", f"expected in a {ckpt['job_hours']:g} h job: MTBF "
             f"{ckpt['job_mtbf_hours']:.3g} h on {ckpt['nodes']} node(s) (system.node_mtbf_hours)")]
    if "goodput" in ckpt:
        rows.append(("goodput", f"{ckpt['goodput']:.1%}", f"checkpoint every {ckpt['interval_steps']} steps; Daly's "
                     f"optimum {ckpt['optimal_interval_steps']} steps ({ckpt['goodput_at_optimal']:.1%})"))
    return rows


def print_what_if(est: dict[str, Any]) -> None:
    """The step by the resource it waits on, and the speed-up from doubling each resource."""
    from rich.console import Console
    from rich.table import Table

    if "time_by_resource_s" not in est:
        print(f"no breakdown: {est.get('step_time_s_reason')}")
        return
    step = est["step_time_s"]
    table = Table(title="where the step goes, and what a 2x faster resource would buy (costmodel/whatif.py)",
                  title_justify="left")
    for column in ("part of the step", "seconds", "share"):
        table.add_column(column, justify="left" if column == "part of the step" else "right")
    for part, seconds in est["time_by_resource_s"].items():
        if seconds > 0:
            table.add_row(part, f"{seconds:.4g}", f"{seconds / step:.1%}")
    for scenario, result in est["what_if"].items():
        table.add_row(f"what if: {scenario}", f"{result['step_time_s']:.4g}", f"{result['speedup']:.2f}x faster")
    Console().print(table)


USAGE = f"""usage: harness estimate [overrides ...] [--json] [--what-if]

Predict per-device memory, communication, step time, MFU and energy of one layout with the analytical
cost model, checked as `harness run` would check it (but for the interleaved stages and context parallelism another
framework's profile, costmodel.software=megatron-lm, runs itself). Exit status 1 when it does not fit the device
(more than {REFUSE_ABOVE:g}× its memory; `harness run` warns below that and refuses above).

  harness estimate model=gpt-1t system=frontier backend=deepspeed3d parallel.tp=8 parallel.pp=64 \\
      parallel.world_size=3072
  harness estimate model=gpt-1.3b backend=fsdp parallel.world_size=8 system=dgx-a100-80gb --json
  harness estimate model=gpt-13b system=dgx-h100 backend=fsdp parallel.world_size=64 train.precision=bf16 --what-if
        the step by resource, and its speed-up with 2x the GEMM rate, memory, intra- or inter-node bandwidth"""


def estimate_command(args: list[str]) -> int:
    """Exit status: 0, or 1 when the layout does not fit the device memory (the numbers still print)."""
    try:
        overrides, flags = split_command_args(args, {"--json": bool, "--what-if": bool})
    except HelpRequested:
        print(USAGE)
        return 0
    cfg = compose(overrides)
    # what `harness run` checks, bar this host, and bar what only the harness's backend cannot run where the config
    # predicts another framework's run (costmodel.software=megatron-lm, ...)
    checked = check_config(cfg, planned_world_size(cfg), runs=False)
    layout, est = checked.layout, checked.estimate
    if "--json" in flags:
        print(json.dumps(est, indent=2))
    else:
        print_estimate(cfg, layout, est)
        if "--what-if" in flags:
            print_what_if(est)
    for warning in est["reach_warnings"]:
        print(f"harness: warning: {warning}", file=sys.stderr)
    if est["memory_verdict"] == "too big":
        print(f"harness: error: fits: false — {_fmt_bytes(est['memory_per_device_bytes']['total'])} per device "
              f"needed, {_fmt_bytes(est['device_memory_bytes'])} available ("
              + ", ".join(f"{k} {_fmt_bytes(est['memory_per_device_bytes'][k])}" for k in MEMORY_KEYS[:-1]) + ")",
              file=sys.stderr)
        return 1
    return 0

