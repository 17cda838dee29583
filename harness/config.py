"""The config schema (Hydra structured configs) and the checks that run before any process starts.

Hydra composes `conf/` onto these dataclasses, so a misspelt key or a wrong type is rejected by
OmegaConf; `validate` then checks what types cannot express (divisibility, files, choices) and
raises `ConfigError` with one line naming the field and the fix. Nothing here imports torch: the
cost model and the CLI use it before any heavy import.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from launchers.env import GPU_ORDERS

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

BACKENDS = ("ddp", "fsdp", "deepspeed", "deepspeed3d")
PRECISIONS = ("fp32", "fp16", "bf16")
CHECKPOINTING = ("none", "selective", "full")
DATA_KINDS = ("synthetic", "tokens")
TOKEN_DTYPES = {"uint16": 2, "uint32": 4}
DEVICES = ("auto", "cpu", "cuda", "xpu")


class ConfigError(ValueError):
    """An invalid configuration: the message is one line naming the field and the fix."""


@dataclass
class ModelConfig:
    """GPT dimensions; the fields mirror `models.gpt.GPTConfig` (a test keeps them in step)."""

    name: str = MISSING
    """Name of the size, for run names and reports."""
    n_layers: int = MISSING
    """Transformer blocks."""
    d_model: int = MISSING
    """Hidden size."""
    n_heads: int = MISSING
    """Query heads; must divide d_model."""
    n_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention; None means n_heads (plain multi-head)."""
    ffn_hidden: Optional[int] = None
    """MLP width; None means 4 * d_model."""
    seq_len: int = 2048
    """Tokens per sample."""
    vocab_size: int = 51200
    """Vocabulary, already padded (Megatron pads GPT-2's 50257 to a multiple of 128 or 1024)."""
    activation: str = "gelu"
    """gelu (Megatron), gelu_tanh (GPT-2's gelu_new) or swiglu."""
    norm: str = "layernorm"
    """layernorm or rmsnorm."""
    position: str = "learned"
    """learned absolute positions or rope."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection."""
    bias: bool = True
    """Biases in linears and norms."""
    norm_eps: float = 1e-5
    init_std: float = 0.02
    rope_theta: float = 10000.0


@dataclass
class BackendConfig:
    """Which parallel backend trains the model, and its own options."""

    name: str = "ddp"
    """ddp | fsdp | deepspeed | deepspeed3d."""
    sharding: str = "full_shard"
    """fsdp: full_shard | shard_grad_op | hybrid_shard | no_shard (FSDP1's names, mapped onto FSDP2)."""
    hybrid_shard_group: Optional[int] = None
    """fsdp hybrid_shard: ranks that shard one replica (FSDP2's HSDP); None means system.devices_per_node."""
    prefetch_depth: int = 0
    """fsdp: all-gather the next (forward) / previous (backward) k blocks explicitly; 0: FSDP2's implicit one."""
    offload: bool = False
    """fsdp: keep sharded parameters, gradients and optimizer state on the CPU (FSDP2's CPUOffloadPolicy)."""
    param_dtype: Optional[str] = None
    """fsdp: dtype blocks compute in (fp32 | bf16 | fp16); None follows train.precision."""
    reduce_dtype: Optional[str] = None
    """fsdp: dtype gradients are reduced in; None means fp32."""
    offload_optimizer: bool = False
    """deepspeed: keep optimizer states on the CPU and step there (ZeRO-Offload; ZeRO stage 1 or more)."""
    offload_param: bool = False
    """deepspeed: keep parameters on the CPU between uses (ZeRO-Infinity; ZeRO stage 3 only)."""
    initial_scale_power: int = 16
    """deepspeed fp16: the dynamic loss scale starts at 2**initial_scale_power."""
    loss_scale_window: int = 1000
    """deepspeed fp16: overflow-free steps before the loss scale doubles."""
    hysteresis: int = 2
    """deepspeed fp16: overflows tolerated before the loss scale halves."""
    min_loss_scale: float = 1.0
    """deepspeed fp16: the loss scale never falls below this."""
    ds_config: dict[str, Any] = field(default_factory=dict)
    """deepspeed, deepspeed3d: extra DeepSpeed JSON keys merged (recursively) over the generated config."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: int = 1
    """Virtual pipeline stages per rank (interleaved schedule)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage."""
    sequence_parallel: bool = False
    world_size: Optional[int] = None
    """Derived from the launched ranks by `run`; given explicitly to `estimate`/`plan`."""


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    """Samples per rank per forward/backward."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all ranks; None means micro_batch_size * dp (no accumulation)."""
    steps: int = 10
    """Timed optimizer steps (after the warm-up steps)."""
    warmup_steps: int = 2
    """Optimizer steps run first and left out of the summary (allocator, caches, lazy init)."""
    precision: str = "fp32"
    """fp32 | fp16 | bf16 (mixed precision: fp32 master weights)."""
    activation_checkpointing: str = "none"
    """none | selective (attention sub-layer) | full (every block)."""
    checkpoint_every_n: Optional[int] = None
    """selective: None checkpoints every block's attention; n checkpoints every n-th whole block (torchtitan's
    selective_ac_option=n), trading memory against recompute between none and full."""
    compile: bool = False
    """torch.compile every block (after checkpointing, before sharding: torchtitan's order)."""
    compile_backend: str = "inductor"
    """torch.compile backend; aot_eager traces without generating code (fast, for tests)."""
    fault_inject_oom_step: Optional[int] = None
    """Testing the failure path: the last rank raises torch.OutOfMemoryError at this step."""
    seed: int = 1234
    lr: float = 3e-4
    """Constant learning rate (a benchmark has no use for a schedule)."""
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""


@dataclass
class DataConfig:
    kind: str = "synthetic"
    """synthetic (seeded random tokens) | tokens (a flat binary file of token ids)."""
    path: Optional[str] = None
    """tokens: the file."""
    dtype: str = "uint16"
    """tokens: uint16 or uint32."""


@dataclass
class JobConfig:
    """How `harness submit <system>` writes and submits a batch job (launchers/jobscript.py)."""

    scheduler: str = "slurm"
    """slurm | pbs | lsf."""
    script: str = "scripts/slurm/generic.sbatch"
    """The job script template, relative to the project root."""
    ranks_per_node: Optional[int] = None
    """Ranks one node holds; None means devices_per_node (one rank per GPU, GCD or tile)."""
    account_required: bool = False
    """Whether the site refuses jobs without an allocation to charge."""
    queue: Optional[str] = None
    """Default partition (Slurm), QOS (Perlmutter) or queue (PBS, LSF); None keeps the template's."""
    walltime: str = "00:30:00"
    """Default wall-time, HH:MM:SS."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra variables the job script exports (the site's own settings live in the template)."""


@dataclass
class SystemConfig:
    """The machine: device kind and what is known of its peaks (issue-specific fields grow here)."""

    name: str = "cpu"
    device: str = "auto"
    """auto | cpu | cuda (ROCm builds of torch report 'cuda' too) | xpu (Intel GPUs, xccl backend)."""
    peak_tflops: Optional[float] = None
    """A measured dense peak for the run's precision; overrides the built-in table."""
    peak_tflops_source: Optional[str] = None
    """Where peak_tflops comes from (required when peak_tflops is set)."""
    devices_per_node: int = 1
    # -- hardware the cost model reads (harness/costmodel); each profile in conf/system/ cites its sources --
    accelerator: Optional[str] = None
    """Device model, looked up in harness/costmodel/peaks.py for the precision's peak (e.g. A100, MI250X)."""
    memory_gb: Optional[float] = None
    """Memory per device, GB (1e9 bytes); None: unknown, so `fits` is null."""
    hbm_bw_gb_per_s: Optional[float] = None
    """Device memory bandwidth, for the memory-bound (non-GEMM) work of a step."""
    intra_node_bw_gb_per_s: Optional[float] = None
    """Per-device, per-direction bandwidth between devices of one node (NVLink, Infinity Fabric, Xe Link)."""
    inter_node_bw_gb_per_s: Optional[float] = None
    """Per-device, per-direction network bandwidth between nodes (NICs per node / devices per node)."""
    idle_power_w: Optional[float] = None
    """Power of one device while idle."""
    peak_power_w: Optional[float] = None
    """Power of one device at full load (its TDP/TBP)."""
    gemm_efficiency: float = 0.7
    """Fraction of the peak a large GEMM reaches."""
    gemm_half_gflop: float = 1.0
    """GEMM size (GFLOP) at which it reaches half of gemm_efficiency: small GEMMs do not fill the device."""
    elementwise_passes: float = 6.0
    """Device-memory passes over each stored activation byte by the non-GEMM kernels (norms, softmax, GELU...)."""
    comm_efficiency: float = 0.8
    """Fraction of the link bandwidth a large collective reaches."""
    comm_latency_us: float = 10.0
    """Fixed cost of one collective call."""
    framework_overhead_gb: float = 0.0
    """Memory per device that no model tensor explains (CUDA/HIP context, allocator, communicator buffers)."""
    layer_overhead_us: float = 0.0
    """Host time per block per micro-batch that no FLOP or byte explains (operator dispatch, autograd);
    matters on a CPU, hidden behind the kernels on a GPU."""
    step_overhead_us: float = 0.0
    """The same outside the blocks (embeddings, head, loss, optimizer calls, the training loop)."""
    overlap_comm: bool = True
    """Communication runs concurrently with compute (false on a CPU, whose cores do both)."""
    calibration: Optional[str] = None
    """What set the efficiency figures: `harness calibrate` (with the date) or the fit they come from."""
    job: JobConfig = field(default_factory=JobConfig)
    """Batch job settings for `harness submit`."""


@dataclass
class LauncherConfig:
    nproc: int = 1
    """Local ranks to start when not already inside torchrun/srun/mpiexec."""
    omp_num_threads: Optional[int] = None
    """Threads per rank; None means the host's cores divided by the local ranks (at least 1)."""
    pg_timeout_s: int = 300
    """Collective timeout: a benchmark that stalls this long is broken, not slow."""
    monitor_interval_s: float = 0.1
    """How often the local agent checks its ranks; a dead rank ends the job within about this."""
    watchdog_s: float = 600.0
    """End the job (status failed, stop_reason watchdog) when no step finishes for this long; 0 disables."""
    walltime_margin_s: float = 120.0
    """Stop this long (plus one step) before the batch allocation ends, so the summary is written in time."""
    gpu_order: str = "local_rank"
    """local_rank: local rank i drives device i | reversed: device n-1-i (Polaris, where GPU 3 is nearest cores 0-7)."""


@dataclass
class TelemetryConfig:
    """Power, energy and utilisation sampling (harness/telemetry/)."""

    source: str = "auto"
    """auto (NVML on NVIDIA, amdsmi then rocm-smi on ROCm, RAPL on CPU) | nvml | amdsmi | rocm-smi | rapl | none."""
    interval_ms: float = 100.0
    """Background sampling period; NVML's energy counter itself moves only about every 100 ms."""
    idle_s: float = 3.0
    """Idle power is measured this long before the first step (also checks the energy counter); 0 skips it."""
    powercap_root: str = "/sys/class/powercap"
    """Where RAPL zones live (a different root only for tests and containers that bind-mount it)."""


TELEMETRY_SOURCES = ("auto", "nvml", "amdsmi", "rocm-smi", "rapl", "none")


def _check_telemetry(t: Any) -> None:
    _choice(t.source, TELEMETRY_SOURCES, "telemetry.source")
    if t.interval_ms < 10:
        raise ConfigError(f"telemetry.interval_ms={t.interval_ms}: sample at most every 10 ms "
                          "(NVML's counters move every ~100 ms; faster only costs CPU)")
    if t.idle_s < 0:
        raise ConfigError(f"telemetry.idle_s={t.idle_s}: must be 0 (skip idle power) or more")


@dataclass
class Config:
    name: str = "${model.name}-${backend.name}"
    """Run name, part of the run directory."""
    model: ModelConfig = field(default_factory=ModelConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)


def register_schema() -> None:
    """Make the schema available to `conf/config.yaml` as `base_config`."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)


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


def group_choices(group: str) -> list[str]:
    """The named options of a config group, from the YAML files in conf/<group>/."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_group_overrides(overrides: list[str]) -> None:
    """Reject `model=unknown` before Hydra does (Hydra's message spans many lines)."""
    groups = [p.name for p in CONF_DIR.iterdir() if p.is_dir()]
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep or key not in groups:
            continue
        choices = group_choices(key)
        for choice in value.split(","):  # a -m sweep lists several
            if choice not in choices:
                raise ConfigError(f"{key}={choice}: unknown {key}; choose one of: {', '.join(choices)}")


def _choice(value: str, choices: tuple[str, ...] | list[str], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value}: unknown value; choose one of: {', '.join(choices)}")


def _check_model(m: Any) -> None:
    for key in ("n_layers", "d_model", "n_heads", "seq_len", "vocab_size"):
        if getattr(m, key) < 1:
            raise ConfigError(f"model.{key}={getattr(m, key)}: must be at least 1")
    if m.d_model % m.n_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
            f"choose n_heads from the divisors of d_model (e.g. {_nearest_divisor(m.d_model, m.n_heads)})"
        )
    if m.n_kv_heads is not None and (m.n_kv_heads < 1 or m.n_heads % m.n_kv_heads):
        raise ConfigError(
            f"model.n_kv_heads={m.n_kv_heads} does not divide model.n_heads={m.n_heads}; choose a divisor"
        )
    _choice(m.activation, ("gelu", "gelu_tanh", "swiglu"), "model.activation")
    _choice(m.norm, ("layernorm", "rmsnorm"), "model.norm")
    _choice(m.position, ("learned", "rope"), "model.position")


@dataclass(frozen=True)
class BackendAbilities:
    """What layouts a backend can run; `validate` refuses the rest before any process starts."""

    tensor_parallel: bool
    pipeline_parallel: bool
    zero_stages: tuple[int, ...]
    precisions: tuple[str, ...] = PRECISIONS


ABILITIES = {
    "ddp": BackendAbilities(tensor_parallel=False, pipeline_parallel=False, zero_stages=(0,)),
    # FSDP2 shards itself (no ZeRO stage); fp16 would need a sharded gradient scaler.
    "fsdp": BackendAbilities(tensor_parallel=True, pipeline_parallel=False, zero_stages=(0,),
                             precisions=("fp32", "bf16")),
    "deepspeed": BackendAbilities(tensor_parallel=False, pipeline_parallel=False, zero_stages=(0, 1, 2, 3)),
    "deepspeed3d": BackendAbilities(tensor_parallel=True, pipeline_parallel=True, zero_stages=(0, 1)),
}


def _check_parallel(backend: str, m: Any, p: Any, precision: str) -> None:
    """The parallel sizes against what `backend` can do and what the model's shapes allow."""
    can = ABILITIES[backend]
    for key in ("tp", "pp", "vpp"):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallel.{key}={getattr(p, key)}: must be at least 1")
    if precision not in can.precisions:
        raise ConfigError(f"train.precision={precision}: backend={backend} supports {', '.join(can.precisions)}")
    if p.zero_stage not in can.zero_stages:
        if backend == "deepspeed3d":
            raise ConfigError(f"parallel.zero_stage={p.zero_stage}: DeepSpeed's pipeline engine supports ZeRO-1 "
                              "only; use parallel.zero_stage=1 (or 0) with backend=deepspeed3d")
        raise ConfigError(f"parallel.zero_stage={p.zero_stage}: backend={backend} supports "
                          f"{', '.join(map(str, can.zero_stages))}; ZeRO stages 1-3 need backend=deepspeed")
    if p.tp > 1 and not can.tensor_parallel:
        raise ConfigError(f"parallel.tp={p.tp}: backend={backend} has no tensor parallelism; "
                          "use backend=fsdp or backend=deepspeed3d")
    if (p.pp > 1 or p.vpp > 1) and not can.pipeline_parallel:
        raise ConfigError(f"parallel.pp={p.pp} vpp={p.vpp}: backend={backend} has no pipeline parallelism; "
                          "use backend=deepspeed3d")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1 (it splits the sequence over TP ranks)")
    if p.sequence_parallel and backend == "deepspeed3d" and m.seq_len % p.tp:
        raise ConfigError(f"parallel.sequence_parallel=true splits model.seq_len={m.seq_len} over parallel.tp={p.tp} "
                          "ranks (megatron-core: equal shards); choose a seq_len divisible by tp")
    _check_tensor_parallel(m, p.tp)
    if p.pp > m.n_layers:
        raise ConfigError(f"parallel.pp={p.pp} is larger than model.n_layers={m.n_layers}; "
                          "every pipeline stage needs at least one block")


def _check_tensor_parallel(m: Any, tp: int) -> None:
    """Megatron splits whole heads and whole FFN columns over TP ranks."""
    widths = {"model.n_heads": m.n_heads, "model.ffn_hidden": ffn_hidden(m)}
    if m.n_kv_heads is not None:
        widths["model.n_kv_heads"] = m.n_kv_heads
    for key, width in widths.items():
        if width % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide {key}={width}; "
                              f"choose tp from its divisors (e.g. {_nearest_divisor(width, tp)})")


DS_BATCH_KEYS = {"train_batch_size": "train.global_batch_size", "train_micro_batch_size_per_gpu":
                 "train.micro_batch_size", "gradient_accumulation_steps": "train.global_batch_size"}


def _check_deepspeed(b: Any, p: Any, precision: str, device: str) -> None:
    """Offload and the extra DeepSpeed keys: only for the DeepSpeed backends, never against the harness's own fields."""
    deepspeed, zero_stage = b.name in ("deepspeed", "deepspeed3d"), p.zero_stage
    if b.ds_config and not deepspeed:
        raise ConfigError(f"backend.ds_config is set but backend={b.name}; it needs backend=deepspeed or deepspeed3d")
    for key, needs in (("offload_optimizer", 1), ("offload_param", 3)):
        if not getattr(b, key):
            continue
        if b.name != "deepspeed":
            raise ConfigError(f"backend.{key}=true needs backend=deepspeed (ZeRO-Offload)")
        if zero_stage < needs:
            raise ConfigError(f"backend.{key}=true needs parallel.zero_stage>={needs}; got {zero_stage}")
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
    if deepspeed and precision == "fp16" and device == "cpu":
        raise ConfigError("train.precision=fp16: DeepSpeed's CPU accelerator has no fp16; use bf16 or fp32 on CPU")


FSDP_SHARDING = ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")


def _check_fsdp(b: Any, devices_per_node: int, dp: int, precision: str, tp: int, device: str) -> None:
    """The FSDP2 options; the hybrid group splits the data-parallel ranks into replicas of `group` shards."""
    _choice(b.sharding, FSDP_SHARDING, "backend.sharding")
    if b.sharding == "hybrid_shard":
        group = b.hybrid_shard_group if b.hybrid_shard_group is not None else devices_per_node
        if group < 1 or dp % group:
            raise ConfigError(f"backend.hybrid_shard_group={group} does not divide the {dp} data-parallel ranks; "
                              f"choose a divisor of {dp} (e.g. {_nearest_divisor(dp, group)})")
    if b.prefetch_depth < 0:
        raise ConfigError(f"backend.prefetch_depth={b.prefetch_depth}: must be 0 (FSDP2's implicit one) or more")
    for key in ("param_dtype", "reduce_dtype"):
        if getattr(b, key) is not None:
            _choice(getattr(b, key), PRECISIONS, f"backend.{key}")
    if (b.param_dtype or precision) == "fp16":
        raise ConfigError("backend.param_dtype=fp16: FSDP2 would need a sharded gradient scaler; use bf16")
    if b.offload and tp > 1 and device != "cpu":
        raise ConfigError(f"backend.offload=true with parallel.tp={tp}: torch's parallelize_module moves "
                          "tensor-parallel shards to the GPU and FSDP2's CPUOffloadPolicy refuses parameters not on the CPU; "
                          "use parallel.tp=1 with offload (or system=cpu)")


def _check_train_extras(t: Any, n_layers: int, backend: str) -> None:
    """Checkpointing granularity, compilation and the fault-injection step."""
    if backend == "deepspeed3d" and (t.checkpoint_every_n is not None or t.compile):
        raise ConfigError("train.checkpoint_every_n / train.compile: backend=deepspeed3d builds its pipeline "
                          "stages itself (checkpointing per stage layer); leave them unset")
    if t.checkpoint_every_n is not None:
        if t.activation_checkpointing != "selective":
            raise ConfigError(f"train.checkpoint_every_n={t.checkpoint_every_n} needs "
                              "train.activation_checkpointing=selective")
        if not 1 <= t.checkpoint_every_n <= n_layers:
            raise ConfigError(f"train.checkpoint_every_n={t.checkpoint_every_n}: "
                              f"choose 1..model.n_layers={n_layers}")
    _choice(t.compile_backend, COMPILE_BACKENDS, "train.compile_backend")
    total = t.warmup_steps + t.steps
    if t.fault_inject_oom_step is not None and not 0 <= t.fault_inject_oom_step < total:
        raise ConfigError(f"train.fault_inject_oom_step={t.fault_inject_oom_step}: choose a step in 0..{total - 1}")


def _nearest_divisor(n: int, near: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - near), d))


def _check_data(d: Any, seq_len: int, vocab_size: int) -> None:
    _choice(d.kind, DATA_KINDS, "data.kind")
    if d.kind != "tokens":
        return
    _choice(d.dtype, tuple(TOKEN_DTYPES), "data.dtype")
    if not d.path:
        raise ConfigError("data.path is not set; data=tokens needs data.path=/path/to/tokens.bin")
    path = Path(d.path)
    if not path.is_file():
        raise ConfigError(f"data.path={d.path}: no such file; give an existing token file")
    n_tokens = path.stat().st_size // TOKEN_DTYPES[d.dtype]
    if n_tokens < seq_len + 1:
        raise ConfigError(
            f"data.path={d.path} holds {n_tokens} {d.dtype} tokens, fewer than model.seq_len+1={seq_len + 1}; "
            "use a larger file or a shorter model.seq_len"
        )
    import numpy as np  # only for token files; keeps the common path light

    largest = int(np.memmap(path, dtype=np.dtype(d.dtype), mode="r").max())
    if largest >= vocab_size:
        raise ConfigError(
            f"data.path={d.path} holds token id {largest}, outside model.vocab_size={vocab_size}; "
            "use a model whose vocab_size exceeds the tokenizer's ids"
        )


def validate(cfg: DictConfig | Config, world_size: int) -> Layout:
    """Check the whole config for a job of `world_size` ranks and derive its layout."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    _choice(cfg.backend.name, BACKENDS, "backend")
    _check_model(m)
    _choice(t.precision, PRECISIONS, "train.precision")
    _choice(t.activation_checkpointing, CHECKPOINTING, "train.activation_checkpointing")
    _choice(cfg.system.device, DEVICES, "system.device")
    _choice(cfg.launcher.gpu_order, GPU_ORDERS, "launcher.gpu_order")
    for key in ("watchdog_s", "walltime_margin_s"):
        if cfg.launcher[key] < 0:
            raise ConfigError(f"launcher.{key}={cfg.launcher[key]}: must be 0 or more seconds")
    if cfg.launcher.nproc < 1:
        raise ConfigError(f"launcher.nproc={cfg.launcher.nproc}: must be at least 1 (ranks to start)")
    if t.steps <= 0:
        raise ConfigError(f"train.steps={t.steps}: must be at least 1 timed step")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps}: must be 0 or more")
    if t.micro_batch_size < 1:
        raise ConfigError(f"train.micro_batch_size={t.micro_batch_size}: must be at least 1")
    if cfg.system.peak_tflops is not None and not cfg.system.peak_tflops_source:
        raise ConfigError("system.peak_tflops is set without system.peak_tflops_source; say where it was measured")
    _check_parallel(cfg.backend.name, m, p, t.precision)
    _check_deepspeed(cfg.backend, p, t.precision, cfg.system.device)
    if p.world_size is not None and p.world_size != world_size:
        raise ConfigError(
            f"parallel.world_size={p.world_size} but {world_size} ranks are launched; leave it unset for `run`"
        )
    if world_size % (p.tp * p.pp):
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tp*parallel.pp={p.tp * p.pp}")
    dp = world_size // (p.tp * p.pp)
    _check_train_extras(t, m.n_layers, cfg.backend.name)
    if cfg.backend.name == "fsdp":
        _check_fsdp(cfg.backend, cfg.system.devices_per_node, dp, t.precision, p.tp, cfg.system.device)
    per_step = t.micro_batch_size * dp
    global_batch = t.global_batch_size if t.global_batch_size is not None else per_step
    if global_batch < 1 or global_batch % per_step:
        lower = max(per_step, global_batch // per_step * per_step)
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not divisible by micro_batch_size*dp="
            f"{t.micro_batch_size}*{dp}={per_step}; use a multiple such as {lower} or {lower + per_step}"
        )
    _check_data(cfg.data, m.seq_len, m.vocab_size)
    _check_telemetry(cfg.telemetry)
    return Layout(
        world_size=world_size,
        tp=p.tp,
        pp=p.pp,
        dp=dp,
        zero_stage=p.zero_stage,
        micro_batch_size=t.micro_batch_size,
        global_batch_size=global_batch,
        grad_accum=global_batch // per_step,
    )


def compute_precision(cfg: Any) -> str:
    """The dtype the blocks compute in, which picks the peak MFU divides by: FSDP's param_dtype may differ
    from train.precision."""
    if cfg.backend.name == "fsdp" and cfg.backend.param_dtype is not None:
        return cfg.backend.param_dtype
    return cfg.train.precision


def ffn_hidden(m: Any) -> int:
    """The MLP width a model config resolves to."""
    return m.ffn_hidden if m.ffn_hidden is not None else 4 * m.d_model


def default_threads_per_rank(local_ranks: int) -> int:
    """Share the host's cores among its ranks, so two ranks on two cores do not fight over four threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, math.floor(cores / max(1, local_ranks)))


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """A resolved plain-dict copy, for run directories and for pickling to spawned ranks."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
