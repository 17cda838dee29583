"""The checks that run before any process starts, and the layout they derive.

`validate` checks what the schema's types cannot express (ranges, divisibility, files, what the
chosen backend can do) and raises `ConfigError` with one line naming the field and the fix. The
backends' abilities come from `harness.backends.registry`, the model's own rules from
`models.config.GPTConfig.check`. Nothing here imports torch: the cost model and the CLI use it
before any heavy import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from omegaconf import DictConfig, OmegaConf

from harness.backends.registry import (
    BACKENDS,
    OPTIMIZERS,
    PP_SCHEDULES,
    PRECISIONS,
    backend_spec,
    fsdp_replica_group,
    pipeline_split,
    resolve_pp_schedule,
)
from harness.config.errors import ConfigError
from harness.config.schema import (
    BackendConfig,
    Config,
    DataConfig,
    LauncherConfig,
    ParallelConfig,
    TelemetryConfig,
    TrainConfig,
)
from harness.report import VIEWS
from launchers.env import GPU_ORDERS
from models.config import GPTConfig, ModelConfigError, nearest_divisor

CHECKPOINTING = ("none", "selective", "attention", "full")
"""train.activation_checkpointing: what a block recomputes in the backward: nothing, its core attention
(Korthikanti et al. 2022's selective recomputation), its attention sub-layer, or everything."""
DATA_KINDS = ("synthetic", "tokens", "megatron")
TOKEN_DTYPES = {"uint16": 2, "uint32": 4}
DEVICES = ("auto", "cpu", "cuda", "xpu")
TELEMETRY_SOURCES = ("auto", "nvml", "amdsmi", "rocm-smi", "rapl", "none")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")
DS_BATCH_KEYS = {"train_batch_size": "train.global_batch_size", "train_micro_batch_size_per_gpu":
                 "train.micro_batch_size", "gradient_accumulation_steps": "train.global_batch_size"}
AnyConfig = Union[DictConfig, Config]


@dataclass(frozen=True)
class Layout:
    """How the ranks are arranged and how a global batch is split over them."""

    world_size: int
    tp: int
    pp: int
    dp: int
    zero_stage: int
    micro_batch_size: int
    global_batch_size: int
    grad_accum: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _choice(value: str, choices: Any, key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value}: unknown value; choose one of: {', '.join(choices)}")


def _at_least(section: Any, prefix: str, keys: tuple[str, ...], low: float, what: str) -> None:
    for key in keys:
        value = section[key]
        if value is not None and value < low:
            raise ConfigError(f"{prefix}.{key}={value}: must be {what}")


def check_model(m: Any) -> GPTConfig:
    """The model section as the model's own config, held to the model's own rules."""
    model = GPTConfig.from_section(m)
    try:
        model.check(prefix="model.")
    except ModelConfigError as exc:
        raise ConfigError(str(exc)) from exc
    return model


def _check_parallel(backend: str, model: GPTConfig, p: ParallelConfig, precision: str) -> None:
    """The parallel sizes against what `backend` can do and what the model's shapes allow."""
    can = backend_spec(backend)
    _at_least(p, "parallel", ("tp", "pp", "vpp"), 1, "at least 1")
    if p.zero_stage < 0:
        raise ConfigError(f"parallel.zero_stage={p.zero_stage}: must be 0, 1, 2 or 3")
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
    if p.vpp > 1 and not can.interleaved_pipeline:
        interleaving = [n for n, s in BACKENDS.items() if s.interleaved_pipeline]
        fix = f"use backend={' or backend='.join(interleaving)}" if interleaving else "leave parallel.vpp=1"
        raise ConfigError(f"parallel.vpp={p.vpp}: backend={backend} has no interleaved pipeline schedule "
                          f"(virtual stages); {fix}")
    if p.vpp > 1 and p.pp == 1:
        raise ConfigError(f"parallel.vpp={p.vpp} interleaves pipeline stages and needs parallel.pp > 1; "
                          "set parallel.pp or leave parallel.vpp=1")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1 "
                          "(it splits the sequence over TP ranks)")
    if p.sequence_parallel and can.sequence_parallel_equal_shards and model.seq_len % p.tp:
        raise ConfigError(f"parallel.sequence_parallel=true splits model.seq_len={model.seq_len} over parallel.tp="
                          f"{p.tp} ranks (megatron-core: equal shards); choose a seq_len divisible by tp")
    _check_tensor_parallel(model, p.tp)
    if p.pp > model.n_layers and not can.pipeline_implementation:
        raise ConfigError(f"parallel.pp={p.pp} is larger than model.n_layers={model.n_layers}; "
                          "every pipeline stage needs at least one block")
    stages = p.pp * p.vpp
    if can.pipeline_implementation and p.pp > 1 and pipeline_split(model.n_layers, stages) is None:
        raise ConfigError(f"model.n_layers={model.n_layers} does not split evenly into parallel.pp*parallel.vpp="
                          f"{stages} pipeline stages; choose pp and vpp whose product divides {model.n_layers} "
                          f"(or {model.n_layers + 2}: the embedding and the output layer then take a block's place)")


def _check_pipeline_schedule(b: BackendConfig, p: ParallelConfig, micro_batches: int, compile_blocks: bool,
                             device: str) -> None:
    """backend.pp_schedule against the stages per rank and the micro-batches per step (torch's own rules)."""
    name = resolve_pp_schedule(b.pp_schedule, p.vpp)
    _choice(name, PP_SCHEDULES, "backend.pp_schedule")
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
    stages = p.pp * p.vpp
    fix = "raise train.global_batch_size or lower train.micro_batch_size"
    if schedule.at_least_pp_micro_batches and micro_batches < stages:
        raise ConfigError(f"backend.pp_schedule={name} needs at least {stages} micro-batches per step (one per "
                          f"stage), got {micro_batches}; {fix}")
    rounds = max(1, micro_batches // p.pp)
    if schedule.rounds and micro_batches % rounds:
        raise ConfigError(f"backend.pp_schedule={name}: {micro_batches} micro-batches per step are not a multiple "
                          f"of its {rounds} rounds (micro-batches // parallel.pp); {fix} to a multiple of "
                          f"parallel.pp={p.pp}")


def _check_tensor_parallel(model: GPTConfig, tp: int) -> None:
    """Megatron splits whole heads and whole FFN columns over TP ranks."""
    widths = {"model.n_heads": model.n_heads, "model.ffn_hidden": model.ffn_width}
    if model.n_kv_heads is not None:
        widths["model.n_kv_heads"] = model.n_kv_heads
    for key, width in widths.items():
        if width % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide {key}={width}; "
                              f"choose tp from its divisors (e.g. {nearest_divisor(width, tp)})")


def _check_backend_options(b: BackendConfig) -> None:
    """A `backend.*` option the chosen backend does not read is refused, not silently ignored."""
    defaults = BackendConfig()
    spec = backend_spec(b.name)
    for key in BackendConfig.__dataclass_fields__:
        if key == "name" or key in spec.options:
            continue
        value = b[key] if hasattr(b, "__getitem__") else getattr(b, key)
        if value != getattr(defaults, key) and value:
            owners = [n for n, s in BACKENDS.items() if key in s.options]
            raise ConfigError(f"backend.{key}={value}: backend={b.name} has no such option; it belongs to "
                              f"backend={' or backend='.join(owners)}")


def _check_deepspeed(b: BackendConfig, p: ParallelConfig, precision: str, device: str) -> None:
    """Offload and the extra DeepSpeed keys, never against the harness's own fields."""
    for key, needs in (("offload_optimizer", 1), ("offload_param", 3)):
        if getattr(b, key) and p.zero_stage < needs:
            raise ConfigError(f"backend.{key}=true needs parallel.zero_stage>={needs}; got {p.zero_stage}")
    extra = b.ds_config or {}
    for key, owner in DS_BATCH_KEYS.items():
        if key in extra:
            raise ConfigError(f"backend.ds_config.{key}: the batch is set by {owner}; drop the DeepSpeed key")
    asked = {name for name, keys in (("fp16", ("fp16",)), ("bf16", ("bf16", "bfloat16")))
             if any(hasattr(extra.get(k), "get") and extra[k].get("enabled") for k in keys)}
    requested = sorted(asked | ({precision} - {"fp32"}))
    if len(requested) > 1:
        raise ConfigError(f"fp16 and bf16 both requested (train.precision={precision}, backend.ds_config enables "
                          f"{' and '.join(sorted(asked))}); choose one with train.precision and drop the ds_config key")
    if asked and precision == "fp32":
        raise ConfigError(f"backend.ds_config enables {requested[0]} but train.precision=fp32; "
                          f"set train.precision={requested[0]} instead of the ds_config key")
    if precision == "fp16" and device == "cpu":
        raise ConfigError("train.precision=fp16: DeepSpeed's CPU accelerator has no fp16; use bf16 or fp32 on CPU")
    _at_least(b, "backend", ("loss_scale_window", "hysteresis"), 1, "at least 1")
    if b.min_loss_scale <= 0:
        raise ConfigError(f"backend.min_loss_scale={b.min_loss_scale}: must be positive")


def _check_fsdp(b: BackendConfig, devices_per_node: int, dp: int, precision: str, tp: int, device: str) -> None:
    """The FSDP2 options; the hybrid group splits the data-parallel ranks into replicas of `group` shards."""
    _choice(b.sharding, backend_spec(b.name).shardings, "backend.sharding")
    if b.sharding == "hybrid_shard":
        group = fsdp_replica_group(b.sharding, b.hybrid_shard_group, devices_per_node, dp)
        if group < 1 or dp % group:
            raise ConfigError(f"backend.hybrid_shard_group={group} does not divide the {dp} data-parallel ranks; "
                              f"choose a divisor of {dp} (e.g. {nearest_divisor(dp, max(group, 1))})")
    if b.prefetch_depth < 0:
        raise ConfigError(f"backend.prefetch_depth={b.prefetch_depth}: must be 0 (FSDP2's implicit one) or more")
    for key in ("param_dtype", "reduce_dtype"):
        if getattr(b, key) is not None:
            _choice(getattr(b, key), PRECISIONS, f"backend.{key}")
    if b.param_dtype == "fp16" and precision != "fp16":
        raise ConfigError(f"backend.param_dtype=fp16 with train.precision={precision}: fp16 needs the loss scaler "
                          "that train.precision=fp16 turns on; set train.precision=fp16")
    if precision == "fp16" and b.param_dtype not in (None, "fp16"):
        raise ConfigError(f"train.precision=fp16 with backend.param_dtype={b.param_dtype}: the loss scaler is for "
                          "fp16 compute; drop backend.param_dtype")
    _at_least(b, "backend", ("loss_scale_window",), 1, "at least 1")
    if b.offload and tp > 1 and device != "cpu":
        raise ConfigError(f"backend.offload=true with parallel.tp={tp}: torch's parallelize_module moves "
                          "tensor-parallel shards to the GPU and FSDP2's CPUOffloadPolicy refuses parameters not "
                          "on the CPU; use parallel.tp=1 with offload (or system=cpu)")


def _check_train(t: TrainConfig, n_layers: int, backend: str) -> None:
    """Step counts, batch sizes, optimizer settings, checkpointing granularity, compilation, fault injection."""
    _choice(t.precision, PRECISIONS, "train.precision")
    _choice(t.activation_checkpointing, CHECKPOINTING, "train.activation_checkpointing")
    _at_least(t, "train", ("steps",), 1, "at least 1 timed step")
    _at_least(t, "train", ("micro_batch_size", "global_batch_size"), 1, "at least 1")
    _at_least(t, "train", ("warmup_steps", "weight_decay", "grad_clip"), 0, "0 or more")
    if t.lr <= 0:
        raise ConfigError(f"train.lr={t.lr}: must be positive")
    if backend_spec(backend).builds_own_stages and (t.checkpoint_every_n is not None or t.compile):
        raise ConfigError(f"train.checkpoint_every_n / train.compile: backend={backend} builds its pipeline "
                          "stages itself (checkpointing per stage layer); leave them unset")
    if t.checkpoint_every_n is not None:
        if t.activation_checkpointing != "selective":
            raise ConfigError(f"train.checkpoint_every_n={t.checkpoint_every_n} needs "
                              "train.activation_checkpointing=selective")
        if not 1 <= t.checkpoint_every_n <= n_layers:
            raise ConfigError(f"train.checkpoint_every_n={t.checkpoint_every_n}: "
                              f"choose 1..model.n_layers={n_layers}")
    _choice(t.compile_backend, COMPILE_BACKENDS, "train.compile_backend")
    _choice(t.optimizer, OPTIMIZERS, "train.optimizer")
    deepspeed = backend_spec(backend).deepspeed_engine
    if t.optimizer == "deepspeed_fused_adam" and not deepspeed:
        raise ConfigError(f"train.optimizer=deepspeed_fused_adam is built by DeepSpeed's engine; backend={backend} "
                          "builds torch's: use adamw_fused (or apex_fused_adam), or backend=deepspeed")
    if t.optimizer == "apex_fused_adam" and deepspeed:
        raise ConfigError(f"train.optimizer=apex_fused_adam: backend={backend} builds its optimizer from the DeepSpeed "
                          "config; use deepspeed_fused_adam (its own fused Adam) or adamw_fused")
    total = t.warmup_steps + t.steps
    if t.fault_inject_oom_step is not None and not 0 <= t.fault_inject_oom_step < total:
        raise ConfigError(f"train.fault_inject_oom_step={t.fault_inject_oom_step}: choose a step in 0..{total - 1}")


@dataclass(frozen=True)
class ProfileWindow:
    """The steps a profiled run traces: `warmup` steps run under the profiler and discarded, then `recorded`."""

    warmup: range
    recorded: range

    @property
    def touched(self) -> range:
        """Every step whose time the profiler changes: its warm-up and recorded steps, and the step after them,
        which pays for stopping the trace (torch.profiler collects its events at that transition)."""
        return range(self.warmup.start, self.recorded.stop + 1)

    def label(self, step: int) -> Optional[str]:
        """What the profiler did in `step` (steps.jsonl's `profiler` field): warmup | record | stop, or None."""
        if step in self.warmup:
            return "warmup"
        if step in self.recorded:
            return "record"
        return "stop" if step == self.recorded.stop else None


def profile_window(p: Any, warmup_steps: int, total_steps: int) -> Optional[ProfileWindow]:
    """The window of `profile.*` (None when profiling is off); ConfigError when it does not fit the run or
    leaves no unprofiled timed step to measure the profiler's overhead against."""
    if not p.enabled:
        if p.memory:
            raise ConfigError("profile.memory=true records the profiled window's memory; add profile.enabled=true")
        return None
    if p.steps:
        steps = sorted(int(s) for s in p.steps)
        if steps != list(range(steps[0], steps[0] + len(steps))) or steps[0] < 0:
            raise ConfigError(f"profile.steps={list(p.steps)}: give consecutive steps (one trace window), "
                              "e.g. profile.steps=[4,5]")
        first, active = steps[0], len(steps)
        warmup = min(p.warmup, first)
    else:
        _at_least(p, "profile", ("warmup",), 0, "0 or more")
        _at_least(p, "profile", ("active",), 1, "at least 1 recorded step")
        _at_least(p, "profile", ("wait",), 0, "0 or more")
        warmup, active = p.warmup, p.active
        first = (warmup_steps if p.wait is None else p.wait) + warmup
    window = ProfileWindow(range(first - warmup, first), range(first, first + active))
    if not any(s not in window.touched for s in range(warmup_steps, total_steps)) or window.recorded.stop > total_steps:
        need = window.touched.stop + 1 - warmup_steps
        raise ConfigError(f"profile: steps {window.touched.start}..{window.touched.stop - 1} run under the profiler "
                          f"(recorded {first}..{first + active - 1}); set train.steps={need} or more so that the "
                          "window fits and an unprofiled timed step remains to compare with")
    return window


def _check_launcher(launcher: LauncherConfig) -> None:
    _choice(launcher.gpu_order, GPU_ORDERS, "launcher.gpu_order")
    _choice(launcher.spawn, ("local", "srun"), "launcher.spawn")
    _at_least(launcher, "launcher", ("nproc",), 1, "at least 1 (ranks to start)")
    _at_least(launcher, "launcher", ("omp_num_threads",), 1, "at least 1 thread per rank (or unset: cores / ranks)")
    _at_least(launcher, "launcher", ("pg_timeout_s",), 1, "at least 1 second (a collective's timeout)")
    for key in ("monitor_interval_s",):
        if launcher[key] <= 0:
            raise ConfigError(f"launcher.{key}={launcher[key]}: must be a positive number of seconds")
    _at_least(launcher, "launcher", ("watchdog_s", "walltime_margin_s"), 0, "0 or more seconds")


def megatron_blend(d: DataConfig) -> tuple[list[str], Optional[list[float]]]:
    """(prefixes, weights or None) of data=megatron, from data.prefix, data.blend or data.blend_file: the
    blend tuple megatron-core's BlendedMegatronDatasetConfig takes. ConfigError (one line) for bad input."""
    given = [key for key in ("prefix", "blend", "blend_file") if d[key]]
    if len(given) != 1:
        raise ConfigError("data=megatron needs exactly one of data.prefix=PATH, data.blend=[w,PATH,...] or "
                          f"data.blend_file=FILE (given: {', '.join(given) or 'none'})")
    if d.prefix:
        return [str(d.prefix)], None
    if d.blend_file:
        path = Path(d.blend_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.blend_file={d.blend_file}: no such file; give a list of `weight prefix` lines")
        items: list[Any] = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) not in (2, 3):
                raise ConfigError(f"data.blend_file={d.blend_file} line {number}: expected `weight prefix [corpus]`, "
                                  f"got {line.strip()!r}")
            items += fields[:2]
        where = f"data.blend_file={d.blend_file}"
    else:
        items, where = list(d.blend), "data.blend"
    if not items or len(items) % 2:
        raise ConfigError(f"{where}: give weight, prefix pairs (e.g. [0.3,/data/a_text_document,0.7,/data/b]); "
                          f"got {len(items)} item(s)")
    weights = []
    for weight in items[0::2]:
        try:
            value = float(weight)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: weight {weight!r} is not a number; give weight, prefix pairs") from None
        if not value > 0:
            raise ConfigError(f"{where}: weight {weight!r} must be positive")
        weights.append(value)
    return [str(p) for p in items[1::2]], weights


def _check_megatron(d: DataConfig) -> None:
    prefixes, _ = megatron_blend(d)
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).expanduser().is_file():
                raise ConfigError(f"data: {prefix}{suffix}: no such file; give the prefix of a .bin/.idx pair "
                                  "(harness data prepare writes one)")


def _check_data(d: DataConfig, seq_len: int, vocab_size: int) -> None:
    _choice(d.kind, DATA_KINDS, "data.kind")
    if d.workers < 0:
        raise ConfigError(f"data.workers={d.workers}: must be 0 (load in the step) or more loader processes")
    if d.kind == "megatron":
        _check_megatron(d)
    if d.kind != "tokens":
        return
    _choice(d.dtype, TOKEN_DTYPES, "data.dtype")
    if not d.path:
        raise ConfigError("data.path is not set; data=tokens needs data.path=/path/to/tokens.bin")
    path = Path(d.path).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.path={d.path}: no such file; give an existing token file")
    size = path.stat().st_size
    item = TOKEN_DTYPES[d.dtype]
    if size % item:
        other = [name for name, width in TOKEN_DTYPES.items() if size % width == 0 and name != d.dtype]
        fix = f"use data.dtype={other[0]}" if other else "the file is truncated or not a token file"
        raise ConfigError(f"data.path={d.path} is {size} bytes, not a whole number of {d.dtype} tokens "
                          f"({item} bytes each); {fix}")
    check_token_ids(f"data.path={d.path}", path, d.dtype, size // item, seq_len, vocab_size)


def check_token_ids(label: str, path: Path, dtype: str, n_tokens: int, seq_len: int, vocab_size: int) -> None:
    """A file of token ids (data=tokens, or a Megatron .bin) holds at least one sample (seq_len+1 tokens) and
    only ids the model's vocabulary covers (one pass over the file through a memory map)."""
    if n_tokens < seq_len + 1:
        raise ConfigError(
            f"{label} holds {n_tokens} {dtype} tokens, fewer than model.seq_len+1={seq_len + 1}; "
            "use a larger file or a shorter model.seq_len"
        )
    import numpy as np  # only for token files; keeps the common path light

    largest = int(np.memmap(path, dtype=np.dtype(dtype), mode="r").max())
    if largest >= vocab_size:
        raise ConfigError(
            f"{label} holds token id {largest}, outside model.vocab_size={vocab_size}; "
            "use a model whose vocab_size exceeds the tokenizer's ids"
        )


def _check_telemetry(t: TelemetryConfig) -> None:
    _choice(t.source, TELEMETRY_SOURCES, "telemetry.source")
    if t.interval_ms < 10:
        raise ConfigError(f"telemetry.interval_ms={t.interval_ms}: sample at most every 10 ms "
                          "(NVML's counters move every ~100 ms; faster only costs CPU)")
    if t.idle_s < 0:
        raise ConfigError(f"telemetry.idle_s={t.idle_s}: must be 0 (skip idle power) or more")


def _check_system(system: Any) -> None:
    _choice(system.device, DEVICES, "system.device")
    if system.peak_tflops is not None and not system.peak_tflops_source:
        raise ConfigError("system.peak_tflops is set without system.peak_tflops_source; say where it was measured")
    _at_least(system, "system", ("devices_per_node",), 1, "at least 1")
    _at_least(system, "system", ("peak_tflops", "memory_gb"), 1e-9, "positive")


def _check_report(r: Any) -> None:
    for view in r.views:
        _choice(view, VIEWS, "report.views")
    if r.baseline is not None and "=" not in r.baseline:
        raise ConfigError(f"report.baseline={r.baseline}: give KEY=VALUE, e.g. report.baseline=backend.name=fsdp")


def _batch(t: TrainConfig, dp: int) -> int:
    per_step = t.micro_batch_size * dp
    global_batch = t.global_batch_size if t.global_batch_size is not None else per_step
    if global_batch % per_step:
        lower = max(per_step, global_batch // per_step * per_step)
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not divisible by micro_batch_size*dp="
            f"{t.micro_batch_size}*{dp}={per_step}; use a multiple such as {lower} or {lower + per_step}"
        )
    return global_batch


def _check_world(world_size: int, p: ParallelConfig) -> int:
    """The data-parallel size of `world_size` ranks under tp × pp."""
    if p.world_size is not None and p.world_size < 1:
        raise ConfigError(f"parallel.world_size={p.world_size}: must be at least 1 (devices in the job)")
    if p.world_size is not None and p.world_size != world_size:
        raise ConfigError(
            f"parallel.world_size={p.world_size} but {world_size} ranks are launched; leave it unset for `run`"
        )
    if world_size % (p.tp * p.pp):
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tp*parallel.pp={p.tp * p.pp}; "
                          f"choose tp and pp whose product divides {world_size}")
    return world_size // (p.tp * p.pp)


def check_finite(node: Any, prefix: str = "") -> None:
    """No field holds nan or inf: a learning rate of nan trains nothing and a bandwidth of inf predicts nothing."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        name = f"{prefix}.{key}" if prefix and isinstance(key, str) else f"{prefix}[{key}]" if prefix else str(key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}={value}: must be a finite number")
        check_finite(value, name)


def validate(cfg: AnyConfig, world_size: int) -> Layout:
    """Check the whole config for a job of `world_size` ranks and derive its layout."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    check_finite(OmegaConf.to_container(node, resolve=True))
    p, t, backend = cfg.parallel, cfg.train, cfg.backend.name
    _choice(backend, BACKENDS, "backend")
    model = check_model(cfg.model)
    _check_launcher(cfg.launcher)
    _check_system(cfg.system)
    _check_train(t, model.n_layers, backend)
    _check_backend_options(cfg.backend)
    _check_parallel(backend, model, p, t.precision)
    if backend_spec(backend).deepspeed_engine:
        _check_deepspeed(cfg.backend, p, t.precision, cfg.system.device)
    dp = _check_world(world_size, p)
    if backend_spec(backend).shardings:
        _check_fsdp(cfg.backend, cfg.system.devices_per_node, dp, t.precision, p.tp, cfg.system.device)
    global_batch = _batch(t, dp)
    if "pp_schedule" in backend_spec(backend).options:
        _check_pipeline_schedule(cfg.backend, p, global_batch // (t.micro_batch_size * dp), t.compile,
                                 cfg.system.device)
    _check_data(cfg.data, model.seq_len, model.vocab_size)
    _check_telemetry(cfg.telemetry)
    profile_window(cfg.profile, t.warmup_steps, t.warmup_steps + t.steps)
    _check_report(cfg.report)
    return Layout(world_size=world_size, tp=p.tp, pp=p.pp, dp=dp, zero_stage=p.zero_stage,
                  micro_batch_size=t.micro_batch_size, global_batch_size=global_batch,
                  grad_accum=global_batch // (t.micro_batch_size * dp))


def compute_precision(cfg: Any) -> str:
    """The dtype the blocks compute in, which picks the peak MFU divides by: FSDP's param_dtype may differ
    from train.precision."""
    if "param_dtype" in backend_spec(cfg.backend.name).options and cfg.backend.param_dtype is not None:
        return cfg.backend.param_dtype
    return cfg.train.precision
