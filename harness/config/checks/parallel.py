"""The parallel layout against the backend's abilities and the model's shapes: sizes, tensor and pipeline splits,
the pipeline schedule, the world size and the global batch it divides into."""

from __future__ import annotations

from typing import Optional

from harness.config.checks.common import at_least, choice
from harness.config.schema import (
    BackendConfig,
    ParallelConfig,
    TrainConfig,
)
from harness.core.errors import ConfigError
from harness.core.registry import (
    BACKENDS,
    CP_KINDS,
    PP_SCHEDULES,
    FrameworkLayouts,
    backend_spec,
    pipeline_split,
    resolve_pp_schedule,
)
from harness.models.config import GPTConfig, nearest_divisor


def check_parallel(backend: str, model: GPTConfig, p: ParallelConfig, precision: str,
                   framework: Optional[FrameworkLayouts] = None) -> None:
    """The parallel sizes against what `backend` can do, or where another framework's run is predicted
    (`framework`, checks.validate) what that framework runs beyond it, and what the model's shapes allow."""
    can = backend_spec(backend)
    at_least(p, "parallel", ("tp", "pp", "vpp"), 1, "at least 1")
    if p.zero_stage < 0:
        raise ConfigError(f"parallel.zero_stage={p.zero_stage}: must be 0, 1, 2 or 3")
    interleaves = framework is not None and framework.interleaved_pipeline
    check_backend_can(backend, p, precision, interleaves)
    if p.vpp > 1 and p.pp == 1:
        raise ConfigError(f"parallel.vpp={p.vpp} interleaves pipeline stages and needs parallel.pp > 1; "
                          "set parallel.pp or leave parallel.vpp=1")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1 "
                          "(it splits the sequence over TP ranks)")
    if p.sequence_parallel and can.sequence_parallel_equal_shards and model.seq_len % p.tp:
        raise ConfigError(f"parallel.sequence_parallel=true splits model.seq_len={model.seq_len} over parallel.tp="
                          f"{p.tp} ranks (megatron-core: equal shards); choose a seq_len divisible by tp")
    check_tensor_parallel(model, p.tp)
    if p.pp > model.n_layers and not can.pipeline_implementation:
        raise ConfigError(f"parallel.pp={p.pp} is larger than model.n_layers={model.n_layers}; "
                          "every pipeline stage needs at least one block")
    stages = p.pp * p.vpp
    if (can.pipeline_implementation or interleaves) and p.pp > 1 and pipeline_split(model.n_layers, stages) is None:
        raise ConfigError(f"model.n_layers={model.n_layers} does not split evenly into parallel.pp*parallel.vpp="
                          f"{stages} pipeline stages; choose pp and vpp whose product divides {model.n_layers} "
                          f"(or {model.n_layers + 2}: the embedding and the output layer then take a block's place)")


def check_backend_can(backend: str, p: ParallelConfig, precision: str, interleaves: bool = False) -> None:
    """The precision, ZeRO stage and parallel splits against what the harness's `backend` itself runs; interleaved
    stages also where the framework whose run is predicted runs them (`interleaves`)."""
    can = backend_spec(backend)
    if precision not in can.precisions:
        raise ConfigError(f"train.precision={precision}: backend={backend} supports {', '.join(can.precisions)}")
    if p.zero_stage not in can.zero_stages:
        others = [name for name, spec in BACKENDS.items() if p.zero_stage in spec.zero_stages]
        if can.zero_stage_note:
            stages = " or ".join(map(str, sorted(can.zero_stages, reverse=True)))
            raise ConfigError(f"parallel.zero_stage={p.zero_stage}: {can.zero_stage_note}; use "
                              f"parallel.zero_stage={stages} with backend={backend}")
        fix = f"; ZeRO stage {p.zero_stage} needs backend={' or '.join(others)}" if others else \
            "; DeepSpeed's ZeRO stages are 0-3"
        raise ConfigError(f"parallel.zero_stage={p.zero_stage}: backend={backend} supports "
                          f"{', '.join(map(str, can.zero_stages))}{fix}")
    if p.tp > 1 and not can.tensor_parallel:
        raise ConfigError(f"parallel.tp={p.tp}: backend={backend} has no tensor parallelism; use backend="
                          + " or backend=".join(n for n, s in BACKENDS.items() if s.tensor_parallel))
    if p.pp > 1 and not can.pipeline_parallel:
        raise ConfigError(f"parallel.pp={p.pp}: backend={backend} has no pipeline parallelism; use backend="
                          + " or backend=".join(n for n, s in BACKENDS.items() if s.pipeline_parallel))
    if p.vpp > 1 and not (can.interleaved_pipeline or interleaves):
        interleaving = [n for n, s in BACKENDS.items() if s.interleaved_pipeline]
        fix = f"use backend={' or backend='.join(interleaving)}" if interleaving else "leave parallel.vpp=1"
        raise ConfigError(f"parallel.vpp={p.vpp}: backend={backend} has no interleaved pipeline schedule "
                          f"(virtual stages); {fix}")


def check_pipeline_schedule(b: BackendConfig, p: ParallelConfig, micro_batches: int, compile_blocks: bool,
                             device: str) -> None:
    """backend.pp_schedule against the stages per rank and the micro-batches per step (torch's own rules)."""
    name = resolve_pp_schedule(b.pp_schedule, p.vpp)
    choice(name, PP_SCHEDULES, "backend.pp_schedule")
    if p.pp == 1:
        if b.pp_schedule:
            raise ConfigError(f"backend.pp_schedule={name} needs parallel.pp > 1; set parallel.pp or drop it")
        return
    schedule = PP_SCHEDULES[name]
    wanted = {"single": "parallel.vpp=1", "looped": "parallel.vpp >= 2", "v": "parallel.vpp=2"}[schedule.placement]
    if (schedule.placement == "single") != (p.vpp == 1) or (schedule.placement == "v" and p.vpp != 2):
        raise ConfigError(f"backend.pp_schedule={name} with parallel.vpp={p.vpp}: the schedule runs {wanted} "
                          f"stage(s) per rank; set {wanted}")
    if schedule.split_backward and compile_blocks:
        raise ConfigError(f"train.compile=true with backend.pp_schedule={name}: torch's zero-bubble schedules do "
                          "not support compiled stages (they split each backward in two); use another schedule "
                          "or train.compile=false")
    if b.offload and device != "cpu":
        raise ConfigError(f"backend.offload=true with parallel.pp={p.pp}: the pipeline's tied-embedding "
                          "collectives would run on host-offloaded shards, which NCCL cannot reduce; use "
                          "parallel.pp=1 with offload")
    refused = micro_batches_refused(name, p.pp, p.vpp, micro_batches)
    if refused:
        raise ConfigError(refused)


def micro_batches_refused(name: str, pp: int, vpp: int, micro_batches: int) -> str | None:
    """Why torch's schedule `name` cannot run this many micro-batches per step over pp ranks of vpp stages each
    (None: it can); `harness plan` skips the micro-batch sizes this refuses."""
    schedule = PP_SCHEDULES[name]
    stages = pp * vpp
    fix = "raise train.global_batch_size or lower train.micro_batch_size"
    if schedule.at_least_pp_micro_batches and micro_batches < stages:
        return (f"backend.pp_schedule={name} needs at least {stages} micro-batches per step (one per stage), got "
                f"{micro_batches}; {fix}")
    rounds = max(1, micro_batches // pp)
    if schedule.rounds and micro_batches % rounds:
        return (f"backend.pp_schedule={name}: {micro_batches} micro-batches per step are not a multiple of its "
                f"{rounds} rounds (micro-batches // parallel.pp); {fix} to a multiple of parallel.pp={pp}")
    return None


def check_context_parallel(backend: str, model: GPTConfig, p: ParallelConfig, device: str = "auto",
                           framework: Optional[FrameworkLayouts] = None) -> None:
    """parallel.cp and parallel.cp_kind against the backend, or the framework whose run is predicted where it runs
    that kind itself (`framework`, as check_parallel), the other splits and the model's shapes, and against the
    device system.device names (`auto`: checked by preflight once the host's device is known)."""
    at_least(p, "parallel", ("cp",), 1, "at least 1")
    choice(p.cp_kind, CP_KINDS, "parallel.cp_kind")
    if p.cp == 1:
        return
    kind, can = CP_KINDS[p.cp_kind], backend_spec(backend)
    theirs = framework is not None and p.cp_kind in framework.context_parallel  # not the harness's implementation
    if not theirs and p.cp_kind not in can.context_parallel:
        others = [n for n, s in BACKENDS.items() if p.cp_kind in s.context_parallel]
        raise ConfigError(f"parallel.cp={p.cp}: backend={backend} has no {p.cp_kind} context parallelism; use "
                          f"backend={' or backend='.join(others)}")
    if not theirs and p.pp > 1:
        raise ConfigError(f"parallel.cp={p.cp} with parallel.pp={p.pp}: the harness runs context parallelism with "
                          "data and tensor parallelism, not pipeline stages; set parallel.pp=1 or parallel.cp=1")
    chunks = 2 * p.cp if kind.load_balanced else p.cp
    if model.seq_len % chunks:
        what = f"2·cp={chunks} chunks (two per rank, balancing causal attention)" if kind.load_balanced else \
            f"cp={p.cp} equal chunks"
        raise ConfigError(f"parallel.cp={p.cp}: model.seq_len={model.seq_len} does not split into {what}; choose a "
                          f"seq_len divisible by {chunks}")
    if kind.splits_heads:
        for key, heads in (("model.n_heads", model.n_heads), ("model.n_kv_heads", model.kv_heads)):
            if heads % (p.tp * p.cp):
                raise ConfigError(f"parallel.cp={p.cp} (ulysses) splits {key}={heads} over tp*cp={p.tp * p.cp} "
                                  f"ranks; choose cp from the divisors of {heads // p.tp} or parallel.cp_kind=ring")
    if theirs:
        return
    if kind.name == "ring" and model.position != "rope":
        raise ConfigError(f"parallel.cp_kind=ring with model.position={model.position}: ring attention hands "
                          "each rank two chunks of the sequence and shards the RoPE tables to match; set "
                          "model.position=rope or parallel.cp_kind=ulysses")
    if kind.name == "ring" and model.attention != "sdpa":
        raise ConfigError(f"parallel.cp_kind=ring with model.attention={model.attention}: ring attention replaces "
                          "torch's scaled_dot_product_attention; set model.attention=sdpa")
    check_context_parallel_device(p, device)


def check_context_parallel_device(p: ParallelConfig, device: str) -> None:
    """The context-parallel kind against the device its attention would run on (`auto`: not known yet)."""
    if p.cp > 1 and device != "auto" and device not in CP_KINDS[p.cp_kind].runs_on:
        raise ConfigError(f"parallel.cp_kind={p.cp_kind} on system.device={device}: {CP_KINDS[p.cp_kind].run_note}")


def check_tensor_parallel(model: GPTConfig, tp: int) -> None:
    """Megatron splits whole heads and whole FFN columns over TP ranks."""
    widths = {"model.n_heads": model.n_heads, "model.ffn_hidden": model.ffn_width}
    if model.n_kv_heads is not None:
        widths["model.n_kv_heads"] = model.n_kv_heads
    for key, width in widths.items():
        if width % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide {key}={width}; "
                              f"choose tp from its divisors (e.g. {nearest_divisor(width, tp)})")


def checked_global_batch(t: TrainConfig, dp: int) -> int:
    """The global batch, by default micro-batch × dp; one that is not a multiple of it is refused."""
    per_step = t.micro_batch_size * dp
    global_batch = t.global_batch_size if t.global_batch_size is not None else per_step
    if global_batch % per_step:
        lower = max(per_step, global_batch // per_step * per_step)
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not divisible by micro_batch_size*dp="
            f"{t.micro_batch_size}*{dp}={per_step}; use a multiple such as {lower} or {lower + per_step}"
        )
    return global_batch


def check_world(world_size: int, p: ParallelConfig) -> int:
    """The data-parallel size of `world_size` ranks under tp × pp."""
    if p.world_size is not None and p.world_size < 1:
        raise ConfigError(f"parallel.world_size={p.world_size}: must be at least 1 (devices in the job)")
    if p.world_size is not None and p.world_size != world_size:
        raise ConfigError(
            f"parallel.world_size={p.world_size} but {world_size} ranks are launched; leave it unset for `run`"
        )
    cp = getattr(p, "cp", 1)
    if world_size % (p.tp * p.pp * cp):
        if cp > 1:
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tp*parallel.pp*parallel.cp="
                              f"{p.tp * p.pp * cp}; choose tp, pp and cp whose product divides {world_size}")
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tp*parallel.pp={p.tp * p.pp}; "
                          f"choose tp and pp whose product divides {world_size}")
    return world_size // (p.tp * p.pp * cp)
