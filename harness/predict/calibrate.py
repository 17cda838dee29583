"""`harness calibrate`: measure this host's devices and links and write a system profile for `system=<name>`.

Every local rank measures at the same time, so the figures are what one rank gets while its peers
work too (on a CPU the ranks share cores; on a GPU node they share the links):
- GEMM: torch.matmul of square sizes; a least-squares fit of t = (F + F½)/R gives the large-GEMM
  rate R (written as `peak_tflops`, with `gemm_efficiency` 1) and the half-efficiency size F½;
- memory bandwidth: a copy between two large preallocated tensors;
- host overhead: training steps of the harness's own GPT at negligible width, with 1 and 4 blocks:
  the slope is the overhead per block, the intercept the overhead outside the blocks. With more
  than one rank the probe steps as the runner's DDP ranks do (DistributedDataParallel's reducer
  and hooks, then the runner's per-step all_gather of metrics, which waits for the slowest rank),
  less the gradient all-reduce the cost model charges on its own;
- non-GEMM work: the same at a moderate width (256): what a block costs beyond its GEMMs and its
  overhead, as the streaming efficiency its memory-bound kernels reach (`memory_efficiency`);
- collectives: all-reduce, all-gather and reduce-scatter over the ranks at several sizes; a fit of
  t = latency + wire bytes / B (ring volumes, costmodel/comm.py) gives B and the latency.
The profile lands in the user's config directory (`harness.config.compose.user_config_dir`), whose
`system/` group Hydra searches after the package's.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import re
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from omegaconf import OmegaConf

from harness.config.compose import CONF_DIR, HelpRequested, compose, split_command_args, user_config_dir
from harness.core.console import say
from harness.core.errors import ConfigError
from harness.costmodel.comm import RING_FACTOR

GEMM_SIZES = (64, 128, 256, 512, 768, 1024)
PROBE_WIDTHS = (16, 256)
"""Negligible width (host overhead only) and a moderate one (GEMMs and non-GEMM work show)."""
PROBE_LAYERS = (1, 4)
PROBE_HEADS, PROBE_SEQ, PROBE_VOCAB = 4, 128, 64
COMM_BYTES = (2**16, 2**18, 2**20, 2**22)
METRICS_ROW = 10
"""Floats per rank in the runner's per-step all_gather: loss, peak memory, retries, stop, six of telemetry."""


def _timed(fn: Callable[[], Any], sync: Callable[[], None], min_s: float = 0.2, blocks: int = 3) -> float:
    """Seconds per call: the median over `blocks` blocks of calls lasting `min_s` each, after a warm-up call.

    The median of blocks, not the mean of all calls, so one burst of a neighbour's load on a shared
    host moves the figure less. Every block starts at a barrier, so all ranks measure at the same time:
    a rank that ran on alone after its peers finished would see the whole host.
    """
    import torch.distributed as dist

    fn()
    sync()
    per_call = []
    for _ in range(blocks):
        if dist.is_initialized():
            dist.barrier()
        reps, start = 0, time.perf_counter()
        while True:
            fn()
            reps += 1
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= min_s:
                per_call.append(elapsed / reps)
                break
    return sorted(per_call)[len(per_call) // 2]


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """y = slope·x + intercept by least squares on the relative error (weights 1/y²), so the small sizes
    count as much as the large ones; the intercept is kept non-negative."""
    w = [1 / y**2 for y in ys]
    sw, sx, sy = sum(w), sum(wi * x for wi, x in zip(w, xs)), sum(wi * y for wi, y in zip(w, ys))
    sxx, sxy = sum(wi * x * x for wi, x in zip(w, xs)), sum(wi * x * y for wi, x, y in zip(w, xs, ys))
    slope = (sw * sxy - sx * sy) / (sw * sxx - sx * sx)
    intercept = (sy - slope * sx) / sw
    if intercept < 0:
        return sxy / sxx, 0.0
    return slope, intercept


def measure_rank(precision: str, out_dir: str) -> None:
    """What every rank runs under the local launcher; rank 0 writes the measurements as JSON."""
    import torch.distributed as dist

    from harness.backends.base import DTYPES
    from harness.run.metrics import device_name
    from harness.run.rank import rank_process, synchronize

    with rank_process() as ctx:
        device = ctx.device
        sync = lambda: synchronize(device)  # noqa: E731
        dtype = DTYPES[precision]
        world = dist.get_world_size()
        _measure(device, dtype, world, sync, out_dir, device_name(device) if device.type != "cpu" else "cpu")


def _measure(device: Any, dtype: Any, world: int, sync: Callable[[], None], out_dir: str, name: str) -> None:
    import torch
    import torch.distributed as dist

    from harness.run.environment import cpu_cores

    result: dict[str, Any] = {"world": world, "device": name, "cpu_cores": cpu_cores(), "torch": torch.__version__}
    tell = say if dist.get_rank() == 0 else (lambda message: None)
    dist.barrier()
    tell(f"calibrate: GEMM rate ({len(GEMM_SIZES)} sizes, {world} rank(s) at once)")
    gemm = []
    for n in GEMM_SIZES:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        gemm.append((2.0 * n**3, _timed(lambda: torch.matmul(a, b), sync)))
    result["gemm"] = gemm
    src, dst = torch.ones(2**24, device=device), torch.empty(2**24, device=device)  # 64 MiB each
    tell("calibrate: memory bandwidth")
    result["mem_bw"] = 2 * src.numel() * 4 / _timed(lambda: dst.copy_(src), sync)  # read + write
    probes = list(itertools.product(PROBE_WIDTHS, PROBE_LAYERS))
    for i, (width, layers) in enumerate(probes, 1):  # a line each: the host's overhead per block, probe by probe
        tell(f"calibrate: GPT probe {i} of {len(probes)} (width {width}, {layers} blocks)")
        step = _gpt_step(width, layers, device, data_parallel=world > 1)
        # Multi-rank probes take a fixed number of steps: each step is a collective.
        result[f"gpt_{width}_{layers}"] = _timed_collective(step, sync) if world > 1 else _timed(step, sync, 0.3)
    if world > 1:
        tell(f"calibrate: collectives (3 kinds x {len(COMM_BYTES)} sizes)")
        result["comm"] = _measure_collectives(world, device, sync)
    if dist.get_rank() == 0:
        Path(out_dir, "calibration.json").write_text(json.dumps(result))


def _timed_collective(fn: Callable[[], Any], sync: Callable[[], None], calls: int = 10, blocks: int = 3) -> float:
    """Seconds per call with a fixed number of calls: every rank must issue the same collectives,
    so the stopping rule cannot depend on a rank's own clock (that deadlocks)."""
    import torch.distributed as dist

    fn()
    per_call = []
    for _ in range(blocks):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        per_call.append((time.perf_counter() - start) / calls)
    return sorted(per_call)[len(per_call) // 2]


def _probe_config(width: int, layers: int) -> Any:
    from harness.models.gpt import GPTConfig

    return GPTConfig(n_layers=layers, d_model=width, n_heads=PROBE_HEADS, seq_len=PROBE_SEQ, vocab_size=PROBE_VOCAB)


def _gpt_step(width: int, layers: int, device: Any, data_parallel: bool = False) -> Callable[[], None]:
    """One fp32 training step (forward, backward, AdamW) of the harness's GPT, as the runner takes it.

    With `data_parallel`, the model is wrapped in DistributedDataParallel as backend=ddp does, and
    each step ends with the runner's all_gather of one row of float64 metrics per rank (Trainer.reduce).
    """
    import torch
    import torch.distributed as dist

    from harness.backends.base import make_optimizer
    from harness.models.gpt import GPT

    torch.manual_seed(0)
    with torch.device(device):
        model: torch.nn.Module = GPT(_probe_config(width, layers))
    if data_parallel:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = make_optimizer(model.parameters(), SimpleNamespace(lr=1e-4, weight_decay=0.1))
    tokens = torch.randint(0, PROBE_VOCAB, (1, PROBE_SEQ), device=device)
    row = torch.zeros(METRICS_ROW, dtype=torch.float64, device=device)
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size() if data_parallel else 0)]

    def step() -> None:
        model(tokens, tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if data_parallel:
            dist.all_gather(rows, row)
    return step


def _measure_collectives(world: int, device: Any, sync: Callable[[], None]) -> dict[str, list[tuple[float, float]]]:
    import torch
    import torch.distributed as dist

    out: dict[str, list[tuple[float, float]]] = {}
    # torch 2.13 renamed the single-tensor collectives (the old names warn); older releases have only those.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    for kind in ("all_reduce", "all_gather", "reduce_scatter"):
        points = []
        for size in COMM_BYTES:
            full = torch.ones(size // 4, device=device)
            part = torch.ones(size // 4 // world, device=device)
            calls = {"all_reduce": lambda: dist.all_reduce(full),
                     "all_gather": lambda: gather(full[: part.numel() * world], part),
                     "reduce_scatter": lambda: scatter(part, full[: part.numel() * world])}
            points.append((RING_FACTOR[kind](world) * size, _timed_collective(calls[kind], sync)))
        out[kind] = points
    return out


def _per_layer(result: dict[str, Any], width: int, profile: dict[str, Any]) -> tuple[float, float]:
    """(seconds per block, seconds outside the blocks) of a training step at `width`.

    The gradient all-reduce the cost model charges, with `profile`'s communication figures, for each
    multi-rank probe is taken out first, so that it is not counted twice (one rank has none).
    """
    (l1, l2) = PROBE_LAYERS
    t1, t2 = (result[f"gpt_{width}_{n}"] - _probe_dp_comm_s(profile, width, n, result["world"]) for n in (l1, l2))
    per_layer = (t2 - t1) / (l2 - l1)
    return per_layer, max(0.0, t1 - l1 * per_layer)


def _probe_job(width: int, layers: int, world: int = 1) -> Any:
    """The probe GPT as the cost model sees it: one micro-batch of one sample per rank, fp32, DDP."""
    from harness.core.layout import Layout
    from harness.costmodel.layout import Job

    layout = Layout(world_size=world, tp=1, pp=1, dp=world, zero_stage=0, micro_batch_size=1,
                    global_batch_size=world, grad_accum=1)
    return Job(model=_probe_config(width, layers), layout=layout, backend="ddp", sharding="full_shard", offload=False,
               precision="fp32", checkpointing="none", sequence_parallel=False, vpp=1, devices_per_node=world)


def _probe_dp_comm_s(profile: dict[str, Any], width: int, layers: int, world: int) -> float:
    """The modelled gradient all-reduce of one probe step: all of it, since a probe's backward is too
    short to hide it."""
    from harness.costmodel.comm import dp_collectives
    from harness.costmodel.timing import collective_s, hardware

    hw = hardware(SimpleNamespace(**profile), 0.0)
    return sum(collective_s(c, hw) or 0.0 for c in dp_collectives(_probe_job(width, layers, world)))


def modelled_probe_block_s(profile: dict[str, Any], width: int) -> float:
    """What the cost model, with `profile`, predicts for one block of the probe GPT at `width`."""
    from harness.costmodel.timing import hardware, micro_batch_compute_s

    hw = hardware(SimpleNamespace(**profile), profile["peak_tflops"])
    first, last = (micro_batch_compute_s(_probe_job(width, n), hw) for n in PROBE_LAYERS)
    return (last - first) / (PROBE_LAYERS[1] - PROBE_LAYERS[0])


def _memory_efficiency(profile: dict[str, Any], block_s: float, width: int) -> float:
    """The streaming efficiency (of the measured copy bandwidth) at which the model's kernels for the probe block
    (costmodel/kernels.py) take what the block measured beyond its overhead: found by bisection, since a kernel's
    time only falls as the bandwidth rises. Above 1 where a CPU's caches hold the probe's tensors; held within
    [MIN_MEMORY_EFFICIENCY, MAX_MEMORY_EFFICIENCY]."""
    def excess(efficiency: float) -> float:
        return modelled_probe_block_s({**profile, "memory_efficiency": efficiency}, width) - block_s

    low, high = MIN_MEMORY_EFFICIENCY, MAX_MEMORY_EFFICIENCY
    if excess(high) >= 0:
        return high
    if excess(low) <= 0:
        return low
    for _ in range(60):  # geometric bisection: the ratio high/low shrinks to ~1 + 1e-12
        mid = (low * high) ** 0.5
        low, high = (mid, high) if excess(mid) > 0 else (low, mid)
    return (low * high) ** 0.5


MIN_MEMORY_EFFICIENCY = 1e-3
MAX_MEMORY_EFFICIENCY = 10.0


def host_identity() -> dict[str, Any]:
    """What a profile measured here must match to be reused (predict/auto.py): this host, its cores, this torch."""
    import socket
    from importlib import metadata

    from harness.run.environment import cpu_cores

    return {"host": socket.gethostname(), "cpu_cores": cpu_cores(), "torch": metadata.version("torch")}


def profile_from(result: dict[str, Any], base: dict[str, Any], name: str, precision: str) -> dict[str, Any]:
    flops, seconds = zip(*result["gemm"])
    slope, intercept = _fit_line(list(flops), list(seconds))
    today = datetime.date.today().isoformat()
    source = (f"harness calibrate {today}: torch.matmul {GEMM_SIZES[0]}..{GEMM_SIZES[-1]}^3 {precision} "
              f"with {result['world']} ranks busy, fitted large-GEMM rate")
    comm: dict[str, Any] = {}
    if "comm" in result:
        xs = [w for points in result["comm"].values() for w, _ in points]
        ys = [t for points in result["comm"].values() for _, t in points]
        inverse_bw, latency = _fit_line(xs, ys)
        comm = dict(intra_node_bw_gb_per_s=1 / inverse_bw / 1e9, comm_efficiency=1.0, comm_latency_us=latency * 1e6,
                    intra_hop_latency_us=0.0, inter_hop_latency_us=0.0)  # the fitted latency holds the ring's hops
    layer_s, outside_s = _per_layer(result, PROBE_WIDTHS[0], {**base, **comm})
    profile = {
        **base,
        "name": name,
        "devices_per_node": result["world"],
        "peak_tflops": round(1 / slope / 1e12, 6),
        "peak_tflops_source": source,
        "gemm_efficiency": 1.0,
        "gemm_half_gflop": intercept / slope / 1e9,
        "hbm_bw_gb_per_s": result["mem_bw"] / 1e9,
        "layer_overhead_us": layer_s * 1e6,
        "step_overhead_us": outside_s * 1e6,
        "calibration": f"harness calibrate {today} on {result['device']}, {result['world']} ranks",
    }
    profile["calibrated_on"] = {**host_identity(), "device": result["device"], "d_model": PROBE_WIDTHS[1],
                                "seq_len": PROBE_SEQ, "world_size": result["world"], "probes": "square GEMMs "
                                f"{GEMM_SIZES[0]}..{GEMM_SIZES[-1]}, a copy, GPT blocks of width {PROBE_WIDTHS}"}
    if base.get("device") == "cpu" and result.get("cpu_cores"):  # each rank's share of the host (timing.cpu_share)
        profile.update(cores_per_node=result["cpu_cores"], calibrated_ranks_per_node=result["world"])
    profile.update(comm)
    from harness.costmodel.peaks import kernel_startup_us

    # the memory efficiency below is fitted with the device's per-kernel startup beside it: state it, so a later
    # change to the shipped figure does not count twice what the fit already holds
    profile["kernel_startup_us"] = kernel_startup_us(SimpleNamespace(**profile))
    profile["memory_efficiency"] = _memory_efficiency(profile, _per_layer(result, PROBE_WIDTHS[1], profile)[0],
                                                      PROBE_WIDTHS[1])
    return profile


USAGE = """usage: harness calibrate [overrides ...] [--name=NAME]
       harness calibrate --from=RUN_DIR [--name=NAME]

Measure this host's GEMM rate, memory bandwidth, per-step overheads and collectives with every local
rank busy, and write a system profile that `system=NAME` then finds.

  harness calibrate launcher.nproc=2                 profile <system>-calibrated (default system=cpu)
  harness calibrate system=cuda --name=my-node       a named profile for this GPU host
  harness calibrate --from=results/my-run            rates learned from a run made with profile.enabled=true

Profiles are written to {dir}/system/ ($HARNESS_CONFIG_DIR or $XDG_CONFIG_HOME/harness), never into the
installed package."""


def calibrate_from_run(run_dir: Path, name: str | None, overrides: list[str]) -> int:
    """`harness calibrate --from=RUN_DIR`: a profile learned from a profiled run's trace (predict/fromtrace.py)."""
    from harness.predict.fromtrace import profile_from_run

    if overrides:
        raise ConfigError(f"--from: the run's own config is used; drop the overrides ({' '.join(overrides)})")
    if not run_dir.is_dir():
        raise ConfigError(f"--from={run_dir}: no such run directory")
    name = profile_name(name, f"{run_dir.resolve().name}-trace")
    _profile_path(name)
    profile = profile_from_run(run_dir.resolve(), name)
    path = _write_profile(profile, name)
    learned = (f"GEMM {profile['peak_tflops']:.4g} TFLOP/s (half at {profile['gemm_half_gflop']:.3g} GFLOP), "
               f"memory {profile['hbm_bw_gb_per_s']:.3g} GB/s")
    if profile.get("attention_tflops"):
        learned += f", attention {profile['attention_tflops']:.4g} TFLOP/s"
    if "comm_latency_us" in profile and profile.get("calibrated_on", {}).get("world_size", 1) > 1:
        learned += f", collectives {profile['intra_node_bw_gb_per_s']:.3g} GB/s + {profile['comm_latency_us']:.0f} us"
    print(f"learned {learned}, {profile['layer_overhead_us']:.0f} us per block unexplained")
    print(f"wrote {path}; use it with system={name}")
    return 0


def _profile_path(name: str) -> Path:
    """Where profile `name` goes (the user's config directory, created), or a one-line error."""
    path = user_config_dir() / "system" / f"{name}.yaml"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {path.parent} ({exc.strerror}); set HARNESS_CONFIG_DIR to a "
                          "writable directory") from exc
    return path


def _write_profile(profile: dict[str, Any], name: str) -> Path:
    path = _profile_path(name)
    header = f"# Written by `harness calibrate` ({profile['calibration']}). Use it as system={name}.\n"
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.create(profile)))
    return path


NAME_CHARS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def profile_name(name: str | None, system: str) -> str:
    """`--name=NAME` (a file name: letters, digits, '.', '_', '-'), else `<system>-calibrated`; a packaged
    profile's name is refused, so `system=<name>` cannot mean two files."""
    from harness.core.errors import ConfigError

    name = name or f"{system}-calibrated"
    if not NAME_CHARS.match(name):
        raise ConfigError(f"--name={name}: use 1-64 letters, digits, '.', '_' or '-' (it names a file and "
                          "system=<name>), e.g. --name=my-node")
    if (CONF_DIR / "system" / f"{name}.yaml").exists():
        raise ConfigError(f"--name={name}: a profile shipped with harness has this name; choose another, "
                          f"e.g. --name={name}-calibrated")
    return name


def calibrate_command(args: list[str]) -> int:
    """`harness calibrate [system=cpu] [launcher.nproc=N] [train.precision=...] [--name=NAME]`."""
    try:
        overrides, flags = split_command_args(args, {"--name": str, "--from": str})
    except HelpRequested:
        print(USAGE.format(dir=user_config_dir()))
        return 0
    if "--from" in flags:
        return calibrate_from_run(Path(flags["--from"]), flags.get("--name"), overrides)
    cfg = compose(overrides)
    name = profile_name(flags.get("--name"), cfg.system.name)
    nproc = cfg.launcher.nproc
    if nproc < 1:
        raise ConfigError(f"launcher.nproc={nproc}: must be at least 1 (ranks that measure at once)")
    if cfg.train.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision={cfg.train.precision}: unknown value; choose one of: fp32, bf16, fp16")
    _profile_path(name)  # a directory that cannot be written fails before anything is measured
    from harness.launchers.local import launch_local  # torch: once the command is known to be valid
    from harness.run.rank import threads_per_rank

    os.environ["OMP_NUM_THREADS"] = str(threads_per_rank(cfg.launcher.omp_num_threads, nproc))
    from harness.telemetry.process import host_load_now
    from harness.telemetry.summary import BUSY_OTHER_CORES

    before = host_load_now()
    busy = before["busy_cores"] is not None and before["busy_cores"] > BUSY_OTHER_CORES * before["cores"]
    if busy:
        say(f"calibrate: warning: {before['busy_cores']:.1f} of {before['cores']} cores are busy with other work; "
            "the rates measured now include it (a run's auto-calibration measures again next time)")
    say(f"calibrate: starting {nproc} rank(s) to measure this host (about 15 s)")
    with tempfile.TemporaryDirectory() as tmp:
        launch_local(nproc, measure_rank, cfg.train.precision, tmp)
        result = json.loads(Path(tmp, "calibration.json").read_text())
    base = OmegaConf.to_container(cfg.system, resolve=True)
    profile = profile_from(result, base, name, cfg.train.precision)  # type: ignore[arg-type]
    profile["calibrated_on"]["busy_host"] = busy
    print(f"wrote {_write_profile(profile, name)}; use it with system={name}")
    return 0
