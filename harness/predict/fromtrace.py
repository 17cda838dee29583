"""`harness calibrate --from=RUN_DIR`: the cost model's per-kernel-class rates, learned from one profiled run.

Trace-driven prediction (Lumos, MLSys 2025; vTrain, MICRO 2024) profiles real training steps once and predicts
other layouts and scales from what the kernels it saw achieved. Here the run's torch.profiler traces
(`profile.enabled=true`) give, for the profiled steps of every rank:

- GEMMs: each matrix multiply (aten::mm, addmm, bmm, baddbmm; on a GPU the kernels they launch), with its FLOPs
  from the recorded input shapes, fitted as t = (F + F½)/R: the rate R and the size F½ at which a GEMM reaches
  half of it, from the run's own shapes (what `harness calibrate`'s square GEMMs fit);
- attention: the fused attention operators' time against the FLOPs the cost model counts for the run;
- memory-bound work: every other operator, fitted as t = c + bytes/B over its recorded tensors (inputs, and an
  output as large as the largest input): the streaming bandwidth B and the time c each operator costs besides;
- collectives: each one's time against its ring volume, fitted as t = latency + wire bytes / bandwidth;
- what none of these explains (Python between operators, the optimizer loop, waits): spread over the run's
  blocks and micro-batches as `layer_overhead_us`, so that the profiled run is predicted as measured.
The profiler slows the steps it records (it records every operator and its shapes); the operators' times are
scaled by the run's unprofiled median step over its profiled one before fitting.

The profile records what it was learned from (`calibrated_on`: device, torch, model width and depth, layout,
ranks, cores) and `harness estimate` warns when a prediction is far outside it (costmodel/reach.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from harness.core.errors import ConfigError
from harness.trace.comm import collective_kind, input_bytes
from harness.trace.events import Event, Trace, load

GEMM_OPS = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::bmm": (0, 1), "aten::baddbmm": (1, 2)}
"""The matrix multiplies whose FLOPs the input shapes give: operator → the positions of its two matrices."""
ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention", "flash_fwd", "flash_bwd", "fmha",
             "cudnn_attention", "native_sdpa", "flash_fprop", "flash_bprop")
"""Operator or kernel name fragments of the fused attention kernels."""
NO_DATA = {"aten::as_strided", "aten::view", "aten::_reshape_alias", "aten::empty", "aten::empty_strided",
           "aten::empty_like", "aten::resolve_conj", "aten::resolve_neg", "detach", "aten::detach",
           "aten::_unsafe_view",
           "aten::t", "aten::transpose", "aten::expand", "aten::permute", "aten::alias", "aten::slice", "aten::select",
           "aten::unsqueeze", "aten::squeeze", "aten::split", "aten::unbind", "aten::narrow", "aten::reshape",
           "aten::resize_", "aten::set_", "aten::lift_fresh", "aten::_local_scalar_dense", "aten::item",
           "aten::is_nonzero", "aten::result_type"}
"""Operators that allocate, reshape or read metadata but move no tensor data: host time only (0 bytes)."""
NOT_COMPUTE = ("c10d::", "record_param_comms", "gloo:", "nccl:", "rccl:", "ProfilerStep", "harness.")
MIN_GEMMS = 4
"""GEMM records needed to fit a rate and a size; fewer: the run was too small to learn from."""


@dataclass(frozen=True)
class OpTime:
    """One operator (or kernel) of the profiled steps: its class, seconds, FLOPs and bytes."""

    kind: str
    """gemm | attention | memory."""
    seconds: float
    flops: float = 0.0
    bytes: float = 0.0


def gemm_flops(name: str, args: dict[str, Any]) -> Optional[float]:
    """2·M·K·N (times the batch) of a matrix multiply from its recorded input shapes; None if they are missing."""
    positions = GEMM_OPS.get(name)
    dims = args.get("Input Dims") or []
    if positions is None or len(dims) <= max(positions):
        return None
    a, b = dims[positions[0]], dims[positions[1]]
    if not a or not b or len(a) < 2 or len(b) < 2:
        return None
    batch = math.prod(a[:-2]) if len(a) > 2 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def op_bytes(args: dict[str, Any]) -> float:
    """Bytes an operator moves: its recorded tensor inputs, and an output as large as the largest of them."""
    unsized: set[str] = set()
    sizes = [input_bytes({"Input Dims": [d], "Input type": [t]}, unsized)
             for d, t in zip(args.get("Input Dims") or [], args.get("Input type") or [])]
    return sum(sizes) + max(sizes, default=0.0)


def classify(name: str) -> Optional[str]:
    """An operator's kernel class, or None for what is not compute (collectives, the trainer's markers)."""
    if name.startswith(NOT_COMPUTE):
        return None
    if name in GEMM_OPS:
        return "gemm"
    if any(part in name for part in ATTENTION):
        return "attention"
    return "memory"


def in_steps(events: list[Event], trace: Trace) -> list[Event]:
    windows = sorted(trace.steps.values())
    return [e for e in events if any(start <= e.ts and e.end <= end for start, end in windows)]


@dataclass(frozen=True)
class HostOp:
    event: Event
    leaf: bool
    """No other operator runs inside it on its thread."""
    inside: Optional[str]
    """The class of the GEMM or attention operator it runs inside, if any (its work is counted there)."""


def host_ops(trace: Trace) -> list[HostOp]:
    """Every host operator of the trace with its place in the call tree: aten::mm inside aten::linear inside an
    autograd node; the allocations and views inside aten::mm."""
    ops = sorted((e for e in trace.events if e.cat == "cpu_op"), key=lambda e: (str(e.tid), e.ts, -e.dur))
    out: list[HostOp] = []
    stack: list[tuple[Event, bool, Optional[str]]] = []  # (event, has a child, enclosing GEMM/attention class)

    def close(top: tuple[Event, bool, Optional[str]]) -> None:
        out.append(HostOp(top[0], not top[1], top[2]))

    for event in ops:
        while stack and (stack[-1][0].tid != event.tid or stack[-1][0].end <= event.ts):
            close(stack.pop())
        inside = None
        if stack:
            parent = stack[-1]
            stack[-1] = (parent[0], True, parent[2])
            own = classify(parent[0].name)
            inside = parent[2] or (own if own in ("gemm", "attention") else None)
        stack.append((event, False, inside))
    while stack:
        close(stack.pop())
    return out


def leaf_ops(trace: Trace) -> list[Event]:
    """The host operators with no operator inside them."""
    return [op.event for op in host_ops(trace) if op.leaf]


def op_times(trace: Trace) -> list[OpTime]:
    """Every compute operator of the profiled steps, each counted once: on a CPU trace the GEMM and attention
    operators whole, and the leaf operators outside them (the memory-bound work); on an accelerator trace the
    kernels, with the shapes of the operator that launched them."""
    if not trace.has_kernels:
        out = []
        for op in host_ops(trace):
            kind = classify(op.event.name)
            if op.inside or kind is None or (kind == "memory" and not op.leaf):
                continue  # counted in its GEMM or attention operator, not compute, or a composite
            if not in_steps([op.event], trace):
                continue
            e = op.event
            moved = 0.0 if e.name in NO_DATA else op_bytes(e.args)
            out.append(OpTime(kind, e.dur * 1e-6, gemm_flops(e.name, e.args) or 0.0, moved))
        return out
    launcher = launching_ops(trace)
    out, charged = [], set()
    for kernel in in_steps([e for e in trace.events if e.cat == "kernel"], trace):
        if kernel.name.startswith(("nccl", "rccl")):
            continue
        op = launcher.get(kernel.args.get("correlation"))
        name = op.name if op is not None else ""
        if any(p in kernel.name for p in ATTENTION):
            kind = "attention"
        elif "gemm" in kernel.name.lower() or name in GEMM_OPS:
            kind = "gemm"
        else:
            kind = classify(name) or "memory"
        first = op is not None and id(op) not in charged  # an operator's shapes go to its first kernel only
        charged.add(id(op))
        args = op.args if op is not None and first else {}
        out.append(OpTime(kind, kernel.dur * 1e-6, gemm_flops(name, args) or 0.0, op_bytes(args)))
    return out


def launching_ops(trace: Trace) -> dict[Any, Event]:
    """Kernel correlation id → the innermost host operator around the runtime call that launched it (Kineto
    links a kernel to its launch by `correlation`, and the launch sits inside the operator on its thread)."""
    import bisect

    by_thread: dict[Any, list[Event]] = {}
    for e in sorted((e for e in trace.events if e.cat == "cpu_op"), key=lambda e: e.ts):
        by_thread.setdefault(e.tid, []).append(e)
    starts = {tid: [e.ts for e in ops] for tid, ops in by_thread.items()}
    out = {}
    for launch in (e for e in trace.events if e.cat in ("cuda_runtime", "cuda_driver")):
        ops = by_thread.get(launch.tid, [])
        i = bisect.bisect_right(starts.get(launch.tid, []), launch.ts) - 1
        while i >= 0 and ops[i].end < launch.ts:
            i -= 1
        if i >= 0:
            out[launch.args.get("correlation")] = ops[i]
    return out


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """y = slope·x + intercept by ordinary least squares, so the operators that take the time weigh most; the
    intercept kept non-negative."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else my / mx
    intercept = my - slope * mx
    if intercept < 0 or slope <= 0:
        return sum(ys) / sum(xs), 0.0  # through the origin: the total rate
    return slope, intercept


def fit_gemm(ops: list[OpTime]) -> tuple[float, float]:
    """(R FLOP/s, F½ FLOPs) of t = (F + F½)/R over the run's GEMMs."""
    gemms = [o for o in ops if o.kind == "gemm" and o.flops > 0 and o.seconds > 0]
    if len(gemms) < MIN_GEMMS:
        raise ConfigError(f"--from: the trace holds {len(gemms)} matrix multiplies with shapes (need {MIN_GEMMS}); "
                          "profile a run with profile.enabled=true profile.record_shapes=true")
    slope, intercept = fit_line([o.flops for o in gemms], [o.seconds for o in gemms])
    return 1 / slope, intercept / slope


def fit_memory(ops: list[OpTime], host: bool = True) -> tuple[float, float]:
    """(B bytes/s, c seconds per operator): on a host trace c is the median time of the operators that move no
    data (pure host cost: views, allocations); B makes the operators that move data take their measured total,
    Σ bytes / Σ (t − c). On an accelerator trace c = 0: the host's launches are not in the kernels' times, and
    the device's own startup per kernel is, so B holds it (the profile sets kernel_startup_us to 0)."""
    memory = [o for o in ops if o.kind == "memory" and o.seconds > 0]
    still = [o.seconds for o in memory if o.bytes == 0]
    per_op = statistics.median(still) if still and host else 0.0
    moving = [o for o in memory if o.bytes > 0]
    busy = sum(max(0.0, o.seconds - per_op) for o in moving)
    if not moving or busy <= 0:
        raise ConfigError("--from: the trace holds no memory-bound operators with shapes; profile with "
                          "profile.record_shapes=true")
    return sum(o.bytes for o in moving) / busy, per_op


def fit_collectives(traces: list[Trace], world: int) -> Optional[tuple[float, float]]:
    """(bandwidth bytes/s, latency s) of the run's collectives (t = latency + ring volume / bandwidth), from the
    median time of each (kind, size); None without collectives of at least two sizes."""
    from harness.costmodel.network import RING_FACTOR

    times: dict[tuple[str, float], list[float]] = {}
    for trace in traces:
        for e in in_steps(trace.events, trace):
            kind = collective_kind(e.name)
            if kind not in RING_FACTOR or e.tid is None:
                continue
            size = input_bytes(e.args, set())
            if size > 0:
                whole = size * world if kind == "all_gather" else size  # an all-gather's input is its shard
                times.setdefault((kind, whole), []).append(e.dur * 1e-6)
    points = [(RING_FACTOR[kind](world) * size, statistics.median(ts)) for (kind, size), ts in times.items()]
    if len({round(w) for w, _ in points}) < 2:
        return None
    slope, intercept = fit_line([w for w, _ in points], [t for _, t in points])
    return 1 / slope, intercept


def run_config(run_dir: Path) -> Any:
    """The config the run ran with, composed again from its recorded overrides."""
    import yaml

    from harness.config.compose import compose

    overrides = run_dir / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        raise ConfigError(f"--from={run_dir}: not a run directory (no .hydra/overrides.yaml); give a directory "
                          "`harness run` wrote")
    return compose([str(o) for o in yaml.safe_load(overrides.read_text()) or []])


def profile_from_run(run_dir: Path, name: str) -> dict[str, Any]:
    """A system profile learned from the profiled run in `run_dir` (see the module docstring)."""
    import json

    from omegaconf import OmegaConf

    from harness.config.checks import validate
    from harness.costmodel.layout import job_from_config, layers_per_stage
    from harness.costmodel.timing import compute_kernels

    summary_path = run_dir / "summary.json"
    traces_paths = sorted((run_dir / "profile").glob("rank*.json*"))
    if not summary_path.is_file() or not traces_paths:
        raise ConfigError(f"--from={run_dir}: no summary.json or profile/rank*.json.gz there; run it with "
                          "profile.enabled=true first (e.g. harness run launcher.nproc=2 profile.enabled=true)")
    summary = json.loads(summary_path.read_text())
    measured_ms = (summary.get("metrics") or {}).get("iter_time_ms")
    if summary.get("status") != "ok" or not measured_ms:
        raise ConfigError(f"--from={run_dir}: the run did not finish with timed steps (status "
                          f"{summary.get('status')}); calibrate from a finished run")
    cfg = run_config(run_dir)
    layout = validate(cfg, cfg.parallel.world_size or summary["layout"]["world_size"])
    if layout.pp > 1:
        raise ConfigError(f"--from={run_dir}: the run has parallel.pp={layout.pp}; calibrate from a run without "
                          "pipeline stages (its ranks all run the whole model), then predict pipelined layouts")
    traces = [load(p) for p in traces_paths]
    steps = sum(len(t.steps) for t in traces)
    profiled_s = statistics.median(end - start for t in traces for start, end in t.steps.values()) * 1e-6
    dilation = min(1.0, measured_ms / 1e3 / profiled_s)  # the profiler slows what it records: undo it uniformly
    ops = [dataclasses.replace(o, seconds=o.seconds * dilation) for t in traces for o in op_times(t)]
    rate, half = fit_gemm(ops)
    bandwidth, per_op = fit_memory(ops, host=not any(t.has_kernels for t in traces))
    job = job_from_config(cfg, layout)
    block, head = compute_kernels(job)
    per_step = layers_per_stage(job) * job.micro_batches
    model_attention = per_step * sum(k.flops for k in block if k.kind == "attention")
    attention_s = sum(o.seconds for o in ops if o.kind == "attention") / steps
    env = summary.get("env") or {}
    cores = env.get("cpu_cores")
    local = layout.world_size // max(1, len(set(env.get("hostnames") or ["one host"])))  # ranks per host
    base = OmegaConf.to_container(cfg.system, resolve=True)
    profile: dict[str, Any] = {
        **base, "name": name,
        "peak_tflops": rate / 1e12, "gemm_efficiency": 1.0, "gemm_half_gflop": half / 1e9,
        "peak_tflops_source": f"harness calibrate --from={run_dir.name}: {sum(o.kind == 'gemm' for o in ops)} "
                              "matrix multiplies of the run's trace, fitted large-GEMM rate",
        "hbm_bw_gb_per_s": bandwidth / 1e9, "memory_efficiency": 1.0,
        "attention_tflops": model_attention / attention_s / 1e12 if attention_s > 0 and model_attention else None,
        "kernel_launch_us": per_op * 1e6 if cfg.system.device == "cpu" else base.get("kernel_launch_us"),
        "kernel_startup_us": 0.0,  # the traced kernels' times hold each one's startup: the rates above absorb it
        "layer_overhead_us": 0.0, "step_overhead_us": 0.0,
        "devices_per_node": max(local, int(base.get("devices_per_node") or 1)),
    }
    if cfg.system.device == "cpu" and cores:
        profile.update(cores_per_node=int(cores), calibrated_ranks_per_node=local)
    comm = fit_collectives(traces, layout.world_size) if layout.world_size > 1 else None
    if comm is not None:
        # the fitted bandwidth is the node's, for every pair: no link matrix or package link of the base profile
        profile.update(intra_node_bw_gb_per_s=comm[0] / 1e9, intra_node_efficiency=1.0, comm_efficiency=1.0,
                       comm_latency_us=comm[1] * 1e6, intra_hop_latency_us=0.0, inter_hop_latency_us=0.0,
                       intra_node_links=[], package_bw_gb_per_s=None)
    # What the rates leave unexplained of the measured step: per block and micro-batch.
    modelled = _modelled_step_s(cfg, layout, profile)
    left = measured_ms / 1e3 - modelled
    # Where the rates explain more than the unprofiled step took, the profiler slowed some operators more than the
    # step as a whole, so undoing its dilation uniformly left them slow: every learned rate runs faster by the same
    # factor, which scales each modelled time alike, so the source run is reproduced as measured.
    scale = max(1.0, modelled / (measured_ms / 1e3))
    _scale_rates(profile, scale)
    profile["layer_overhead_us"] = max(0.0, left / per_step * 1e6)
    profile["calibrated_on"] = {
        "run": str(run_dir), "device": env.get("device_name"), "torch": env.get("torch"),
        "d_model": int(cfg.model.d_model), "n_layers": int(cfg.model.n_layers), "seq_len": int(cfg.model.seq_len),
        "world_size": layout.world_size, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp,
        "micro_batch_size": layout.micro_batch_size, "backend": cfg.backend.name, "cpu_cores": cores,
        "measured_iter_time_ms": measured_ms, "profiled_iter_time_ms": profiled_s * 1e3, "profiled_steps": steps,
        "ops": len(ops), "rates_scaled_by": round(scale, 4)}
    profile["calibration"] = (f"harness calibrate --from {run_dir} on {datetime.date.today().isoformat()}: "
                              f"{len(ops)} operators of {steps} profiled rank-steps")
    for key in [k for k, v in profile.items() if v is None]:
        del profile[key]
    return profile


RATES = ("peak_tflops", "hbm_bw_gb_per_s", "attention_tflops", "intra_node_bw_gb_per_s")
"""What calibrate learns as a rate (faster is larger); its latencies and per-kernel host times are times."""
TIMES = ("kernel_launch_us", "kernel_startup_us", "comm_latency_us")


def _scale_rates(profile: dict[str, Any], factor: float) -> None:
    """Every learned rate `factor` times faster, every learned time `factor` times shorter."""
    for key in RATES:
        if profile.get(key):
            profile[key] *= factor
    for key in TIMES:
        if profile.get(key):
            profile[key] /= factor


def _modelled_step_s(cfg: Any, layout: Any, profile: dict[str, Any]) -> float:
    from omegaconf import OmegaConf

    from harness.costmodel.estimate import estimate

    trial = OmegaConf.merge(cfg, {"system": {k: v for k, v in profile.items() if k != "calibrated_on"}})
    return float(estimate(trial, layout)["step_time_s"])
