"""The config schema: Hydra structured configs that `conf/` is composed onto.

A misspelt key or a wrong type is rejected by OmegaConf against these dataclasses; everything types
cannot express is checked in `harness.config.checks`. The model section is the model's own dataclass
(`harness.models.config.GPTConfig`) plus a name. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from harness.models.config import GPTConfig


@dataclass
class ModelConfig(GPTConfig):
    """GPT dimensions (`harness.models.config.GPTConfig`'s fields) and the size's name."""

    name: str = MISSING
    """Name of the size, for run names and reports."""


@dataclass
class BackendConfig:
    """Which parallel backend trains the model, and its own options."""

    name: str = "ddp"
    """ddp | fsdp | deepspeed | deepspeed3d."""
    sharding: str = "full_shard"
    """fsdp: full_shard | shard_grad_op | hybrid_shard | no_shard (FSDP1's names, mapped onto FSDP2)."""
    hybrid_shard_group: Optional[int] = None
    """fsdp hybrid_shard: ranks that shard one replica (FSDP2's HSDP); None means one node's data-parallel ranks,
    system.devices_per_node / parallel.tp."""
    prefetch_depth: int = 0
    """fsdp: all-gather the next (forward) / previous (backward) k blocks explicitly; 0: FSDP2's implicit one."""
    offload: bool = False
    """fsdp: keep sharded parameters, gradients and optimizer state on the CPU (FSDP2's CPUOffloadPolicy)."""
    param_dtype: Optional[str] = None
    """fsdp: dtype blocks compute in (fp32 | bf16 | fp16); None follows train.precision."""
    reduce_dtype: Optional[str] = None
    """fsdp: dtype gradients are reduced in; None means fp32."""
    pp_schedule: Optional[str] = None
    """fsdp with parallel.pp > 1: a torch.distributed.pipelining schedule (registry.PP_SCHEDULES); None means
    1F1B, or Interleaved1F1B with parallel.vpp > 1."""
    offload_optimizer: bool = False
    """deepspeed: keep optimizer states on the CPU and step there (ZeRO-Offload; ZeRO stage 1 or more)."""
    offload_param: bool = False
    """deepspeed: keep parameters on the CPU between uses (ZeRO-Infinity; ZeRO stage 3 only)."""
    initial_scale_power: int = 16
    """fp16 (deepspeed, fsdp): the dynamic loss scale starts at 2**initial_scale_power."""
    loss_scale_window: int = 1000
    """fp16 (deepspeed, fsdp): overflow-free steps before the loss scale doubles."""
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
    cp: int = 1
    """Context-parallel size: ranks that share each sequence (harness.core.registry.CP_KINDS)."""
    cp_kind: str = "ulysses"
    """How a context-parallel group shares a sequence: ulysses (all-to-all over heads) | ring (K/V passed round)."""
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
    """What each block recomputes in the backward: a name in harness.core.registry.CHECKPOINTING, which says what
    each means (none | selective | attention | full)."""
    checkpoint_every_n: Optional[int] = None
    """selective: None recomputes every block's core attention; n recomputes every n-th whole block instead
    (torchtitan's selective_ac_option=n), trading memory against recompute between none and full."""
    compile: bool = False
    """torch.compile every block (after checkpointing, before sharding: torchtitan's order)."""
    compile_backend: str = "inductor"
    """torch.compile backend; aot_eager traces without generating code (fast, for tests)."""
    fault_inject_oom_step: Optional[int] = None
    """Testing the failure path: the last rank raises torch.OutOfMemoryError at this step."""
    fault_inject_crash_step: Optional[int] = None
    """Testing restarts: the last rank dies (os._exit) at this step of the job's first attempt."""
    fault_inject_slow_ms: float = 0.0
    """Testing slow ranks and baselines: rank `fault_inject_slow_rank` sleeps this long inside every step."""
    fault_inject_slow_rank: int = 0
    seed: int = 1234
    lr: float = 3e-4
    """Constant learning rate (a benchmark has no use for a schedule)."""
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    optimizer: str = "auto"
    """AdamW's implementation: adamw (torch, its default loop), adamw_foreach, adamw_fused (torch's fused kernel),
    apex_fused_adam (NVIDIA apex, CUDA; ddp and fsdp), deepspeed_fused_adam (DeepSpeed's FusedAdam, CUDA;
    deepspeed backends); auto: deepspeed_fused_adam for a DeepSpeed backend on a GPU, else adamw."""


@dataclass
class DataConfig:
    kind: str = "synthetic"
    """synthetic (seeded random tokens) | tokens (a flat binary file of token ids) | megatron (.bin/.idx
    indexed datasets read through megatron-core's GPTDataset and BlendedDataset)."""
    path: Optional[str] = None
    """tokens: the file."""
    dtype: str = "uint16"
    """tokens: uint16 or uint32."""
    prefix: Optional[str] = None
    """megatron: one dataset, the path of its .bin/.idx pair without the suffix."""
    blend: list[Any] = field(default_factory=list)
    """megatron: [weight, prefix, weight, prefix, ...] as Megatron's --data-path takes them."""
    blend_file: Optional[str] = None
    """megatron: an ALCF-style data list, one `weight prefix [corpus]` line per dataset (# comments)."""
    cache_dir: Optional[str] = None
    """megatron: where megatron-core writes its sample-index cache; None: $HARNESS_CACHE_DIR, else
    $XDG_CACHE_HOME/harness/megatron-indices (~/.cache/...), shared by every rank and reused across runs."""
    workers: int = 0
    """Background loader processes (torch DataLoader) preparing the next steps' batches; 0: in the step."""


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
    """Per device, per direction, into the node's fabric: an NVSwitch port's NVLink bandwidth; with
    point-to-point links (intra_node_links) the sum of a device's links."""
    intra_node_links: list[Any] = field(default_factory=list)
    """Point-to-point fabrics (xGMI on MI250X, NVLink without a switch): per-direction GB/s between each pair of a
    node's devices, 0 where no link joins them; empty: a switch gives every device intra_node_bw_gb_per_s to any
    other (costmodel/network.py)."""
    devices_per_package: int = 1
    """Devices that share one package (a Max 1550's two tiles, which torch's XPU backend sees as two devices): a
    group that fits in one package talks over the package's own link (package_bw_gb_per_s), not the node's fabric."""
    package_bw_gb_per_s: Optional[float] = None
    """Per direction between two devices of one package; None: no link of its own, the node's fabric."""
    intra_node_efficiency: Optional[float] = None
    """Fraction of the fabric's bandwidth a large ring collective reaches (a published nccl-tests/rccl-tests bus
    bandwidth over the line rate); None: comm_efficiency."""
    nvls_efficiency: Optional[float] = None
    """Third-generation NVSwitch (H100/H200): fraction of the link bandwidth an all-reduce inside the node reaches with
    NVLink SHARP (NCCL's NVLS algorithm: payload once each way); None: no in-switch reduction."""
    nvls_across_nodes: bool = True
    """With nvls_efficiency: NCCL runs its NVLS tree across nodes (its default from 2.18 where every node's switch
    supports NVLink SHARP and the network plugin carries it); false where the site's own two-node all-reduce runs at
    the ring's NIC limit (costmodel/network.py Fabric._nvls_s)."""
    nics_per_node: Optional[int] = None
    """Network adapters per node that collectives spread their channels over."""
    nic_bw_gb_per_s: Optional[float] = None
    """Per NIC, per direction."""
    nic_gpu_path: Optional[str] = None
    """How a GPU reaches its nearest NIC, as NCCL names the path (`nvidia-smi topo -m`: PIX, PXB, PHB, SYS; all in
    harness.core.registry.NIC_PATHS): NCCL runs its LL128 protocol across nodes only up to PXB (PXN from Hopper on);
    None: PXB or nearer."""
    nic_efficiency: Optional[float] = None
    """Fraction of the NICs' bandwidth a large ring collective across nodes reaches (a published nccl-tests bus
    bandwidth over the line rate); None: comm_efficiency."""
    coll_channels: Optional[int] = None
    """The channels NCCL/RCCL run a collective on across nodes (the "N coll channels" line NCCL_DEBUG=INFO prints at
    init), which sets how long a tree all-reduce's pipeline takes to fill (costmodel/network.py
    Fabric.tree_fill_s), taken for every group shape though NCCL may build more or fewer channels for another; None:
    not known, so that fill is not priced."""
    idle_power_w: Optional[float] = None
    """Power of one device while idle."""
    peak_power_w: Optional[float] = None
    """Power of one device at full load (its TDP/TBP)."""
    gemm_efficiency: Optional[float] = None
    """Fraction of the peak a large GEMM reaches, in the run's dtype (it replaces the published measurement and its
    per-dtype ratios); None: the accelerator's published measurement (harness/costmodel/peaks.py), else a generic
    0.7."""
    gemm_half_gflop: float = 1.0
    """GEMM size (GFLOP) at which it reaches half of gemm_efficiency: small GEMMs do not fill the device."""
    memory_efficiency: Optional[float] = None
    """Fraction of hbm_bw_gb_per_s a memory-bound kernel (norm, activation, residual add, optimizer) reaches; None:
    the accelerator's published STREAM figure (harness/costmodel/peaks.py), else a generic 0.8."""
    kernel_launch_us: Optional[float] = None
    """Host time to issue one kernel in eager PyTorch (Python, dispatcher, autograd, the launch call), which a GPU
    hides behind kernels that run longer; None: 0 on a CPU (layer_overhead_us holds its host time), else 5."""
    kernel_startup_us: Optional[float] = None
    """Device time each memory-bound or attention kernel costs beyond its work when kernels run back to back on a
    stream (the device taking the launch, first blocks' ramp, last wave's drain); None: the accelerator's published
    measurement (harness/costmodel/peaks.py), else 2.4 µs on a GPU. Always 0 on a CPU, whose operators are host
    calls (layer_overhead_us holds them)."""
    comm_efficiency: float = 0.8
    """Fraction of a link's bandwidth a large collective reaches where no measured figure is given."""
    comm_latency_us: float = 6.6
    """Fixed cost of one collective call in the LL protocol (NCCL's ring base latency, src/graph/tuning.cc); the
    other protocols' are multiples of it (costmodel/network.py `Protocol`)."""
    intra_hop_latency_us: float = 0.6
    """Latency of each step of an LL ring inside a node (NCCL's NVLink hop)."""
    inter_hop_latency_us: float = 2.7
    """Latency of each step of an LL ring across nodes (NCCL's network hop)."""
    framework_overhead_gb: float = 0.0
    """Memory per device that no model tensor explains (CUDA/HIP context, allocator, communicator buffers)."""
    fs_write_bw_gb_per_s: Optional[float] = None
    """Aggregate write bandwidth of the file system checkpoints go to (a site's scratch); None: unknown, so no
    checkpoint time is predicted (costmodel/resilience.py)."""
    fs_read_bw_gb_per_s: Optional[float] = None
    """Its aggregate read bandwidth (a restart loads the checkpoint); None: the write bandwidth."""
    fs_source: Optional[str] = None
    """Where the file-system figures come from."""
    node_mtbf_hours: float = 6335.0
    """Mean time between failures that interrupt a job, per node. Default from Llama 3's pre-training: 419
    unexpected interruptions in a 54-day snapshot (Dubey et al. 2024, "The Llama 3 Herd of Models",
    arXiv:2407.21783, section 3.3.4, 78% hardware), taken on the paper's largest job, 16,384 H100 in 2,048 nodes
    of 8 (the paper does not tie the snapshot to a GPU count): 2,048 × 54 × 24 h / 419. A site's own figure is
    better."""
    layer_overhead_us: float = 0.0
    """Host time per block per micro-batch that no FLOP or byte explains (operator dispatch, autograd);
    matters on a CPU, hidden behind the kernels on a GPU."""
    step_overhead_us: float = 0.0
    """The same outside the blocks (embeddings, head, loss, optimizer calls, the training loop)."""
    overlap_comm: bool = True
    """Communication runs concurrently with compute (false on a CPU, whose cores do both)."""
    overlap_slowdown: Optional[float] = None
    """How much slower compute runs while a collective overlaps it (its kernels hold SMs/CUs and memory bandwidth);
    None: the published cross-GPU average (harness/costmodel/timing.py OVERLAP_SLOWDOWN)."""
    attention_tflops: Optional[float] = None
    """The fused attention kernel's forward + backward rate, measured (`harness calibrate --from`); None: the
    device's published FlashAttention measurement (harness/costmodel/peaks.py), else the GEMM rate."""
    cores_per_node: Optional[int] = None
    """CPU hosts: the cores a host's ranks share. With calibrated_ranks_per_node, a prediction for another number of
    local ranks scales each rank's rates by the cores it gets (costmodel/timing.py cpu_share)."""
    calibrated_ranks_per_node: Optional[int] = None
    """CPU hosts: the local ranks that were busy while the rates were measured."""
    calibrated_on: dict[str, Any] = field(default_factory=dict)
    """What a calibrated profile was measured on (device, software, model width, layout, ranks): `estimate` warns
    when asked far outside it."""
    auto_calibrate: bool = False
    """CPU profiles with no peak: `harness run` measures this host once (harness calibrate) and predicts with that
    profile, kept in the user's config directory (predict/auto.py)."""
    calibration: Optional[str] = None
    """What set the efficiency figures: `harness calibrate` (with the date) or the fit they come from."""
    job: JobConfig = field(default_factory=JobConfig)
    """Batch job settings for `harness submit`."""


@dataclass
class LauncherConfig:
    nproc: int = 1
    """Local ranks to start when not already inside torchrun/srun/mpiexec."""
    spawn: str = "local"
    """How `harness run` starts ranks it was not started inside of: local (launcher.nproc on this host) | srun
    (one srun step over the Slurm job's tasks per run: a sweep driven from the batch shell, point after point;
    the job script sets HARNESS_SPAWN_COMMAND to its site's srun line)."""
    omp_num_threads: Optional[int] = None
    """Threads per rank; None means the host's cores divided by the local ranks (at least 1)."""
    pg_timeout_s: int = 300
    """Collective timeout: a benchmark that stalls this long is broken, not slow."""
    max_restarts: int = 0
    """Local ranks (launcher.nproc): restart the whole job this many times after a rank dies, from its latest complete
    checkpoint (checkpoint.every), with torch elastic's restart machinery; under torchrun, its --max-restarts."""
    monitor_interval_s: float = 0.1
    """How often the local agent checks its ranks; a dead rank ends the job within about this."""
    watchdog_s: float = 600.0
    """End the job (status failed, stop_reason watchdog) when no step finishes for this long; 0 disables."""
    walltime_margin_s: float = 120.0
    """Stop this long (plus one step) before the batch allocation ends, so the summary is written in time."""
    gpu_order: str = "local_rank"
    """local_rank: local rank i drives device i | reversed: device n-1-i (Polaris, where GPU 3 is nearest cores 0-7)."""
    skip_memory_check: bool = False
    """Start even when the cost model predicts more memory per device than a rank has (you know better)."""
    join: Optional[bool] = None
    """Whether this process joins the ranks a launcher started (torchrun, srun, mpiexec, submitit variables in the
    environment): None: when such variables are present; false: ignore them and start launcher.nproc local ranks
    (inside `srun --pty bash`, say); true: require them. launcher.nproc other than 1 must match the ranks per node
    the launcher started."""
    allow_nonempty_dir: bool = False
    """Write a run into a non-empty directory that harness did not make (its files are never overwritten: a run's
    own file names must be free). Off: such a directory is refused."""


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


@dataclass
class ProfileConfig:
    """A torch.profiler trace of a window of steps on every rank, and where each step's time goes
    (harness/trace/). The window follows torch.profiler.schedule: `wait` steps untouched, `warmup` steps
    profiled and discarded (the profiler's own start-up cost), `active` steps recorded."""

    enabled: bool = False
    """Record `profile/rank<k>.json.gz` in the run directory (Perfetto, chrome://tracing, HTA) and write
    summary.json's `breakdown`. Profiled steps are marked in steps.jsonl and left out of the medians."""
    wait: Optional[int] = None
    """Steps before the profiler starts; None: train.warmup_steps (the window starts after warm-up)."""
    warmup: int = 1
    """Steps the profiler runs and discards before recording (torch.profiler's warm-up)."""
    active: int = 2
    """Steps recorded in the trace and analysed."""
    steps: list[int] = field(default_factory=list)
    """Instead of wait/active: the consecutive steps to record (0-based, warm-up steps counted)."""
    record_shapes: bool = True
    """Operator input shapes; the communication bytes per collective kind are computed from them."""
    with_stack: bool = False
    """Python stacks per operator (larger traces, more overhead)."""
    memory: bool = False
    """CUDA only: a memory snapshot of the window, `profile/memory_rank<k>.pickle` (pytorch.org/memory_viz)."""


@dataclass
class CheckpointConfig:
    """Saving and resuming the training state (harness/run/checkpoint.py), each save and load timed per rank."""

    every: int = 0
    """Save after every N-th step (step numbers count from the first step of the first run); 0: never."""
    dir: Optional[str] = None
    """Where the step-<n> directories go (a site's scratch file system); None: <run directory>/checkpoints."""
    resume_from: Optional[str] = None
    """A step-<n> directory to continue from: model, optimizer, step (so the data position) and random state."""
    overwrite: bool = False
    """Allow writing over step-<n> directories that already exist in `dir`."""
    async_save: bool = False
    """ddp, fsdp: stage the state in host memory and write it while training goes on
    (torch.distributed.checkpoint.async_save, on a process group of its own); the step waits only for the staging."""


@dataclass
class SweepConfig:
    """Hydra multirun (`harness run -m ...`) behaviour."""

    resume: bool = True
    """Re-running a sweep into the same hydra.sweep.dir skips each point whose directory already holds a
    finished (status ok) run of the same config, so a sweep cut by a wall-time limit continues where it
    stopped. A point with another config, or one that did not finish, runs again after its earlier files
    are moved into `previous-<n>/` (never deleted). false: a point directory holding a run is refused."""


@dataclass
class SearchConfig:
    """`harness search`: the cost model ranks the layouts, then the best are measured (harness/predict/search.py)."""

    trials: int = 6
    """Layouts to measure."""
    seeds: int = 3
    """The first trials run the cost model's best-ranked layouts; the sampler proposes the rest."""
    method: str = "optuna"
    """The sampler: optuna (TPE)."""
    launcher: Optional[str] = None
    """None: each trial's ranks on this host | a hydra/launcher option (slurm, local): each trial as a job."""
    dir: Optional[str] = None
    """Where the trials' run directories and search.json go; None: results/searches/<date>/<time>-<name>."""
    seed: int = 0
    """The sampler's seed."""


@dataclass
class ReportConfig:
    """What `harness report` shows by default for runs of this config; an experiment names the view that
    reproduces its study's table or figure. Command-line options of `harness report` win."""

    views: list[str] = field(default_factory=list)
    """sweep | compare | scaling | prediction | power | projection | breakdown | comm; empty: chosen from what
    varies across runs (breakdown and comm where runs were profiled)."""
    vs: Optional[str] = None
    """x axis / swept key (a flattened config key such as train.micro_batch_size); None: the key that varies."""
    by: list[str] = field(default_factory=list)
    """Keys that split runs into separate rows or curves (e.g. backend.name)."""
    baseline: Optional[str] = None
    """compare view: KEY=VALUE of the run the others are divided by (e.g. backend.name=fsdp)."""
    study: Optional[str] = None
    """The published table or figure these runs reproduce (a citation), printed above the report."""


@dataclass
class CostModelConfig:
    """Which software the cost model predicts (harness/costmodel/software.py)."""

    software: Optional[str] = None
    """harness-<backend> | megatron-lm | megatron-lm-2021 | megatron-deepspeed; None: the run's own backend."""
    flash_attention: Optional[bool] = None
    """The run's attention kernel when it differs from the profile's (true: fused, no s×s scores stored)."""
    attention_kernel: Optional[str] = None
    """Which fused kernel the run's attention ran (flash | cudnn: software.ATTENTION_KERNELS; a harness run records
    SDPA's choice as kernels.attention.sdpa_kernel in its summary); None: the profile's."""
    tp_comm_overlap: Optional[bool] = None
    """Megatron-LM's --tp-comm-overlap (Transformer Engine userbuffers); None: the profile's."""
    grad_reduce_in_fp32: Optional[bool] = None
    """A bf16 run accumulates and reduces its gradients in fp32 (megatron-core's DistributedDataParallelConfig.
    grad_reduce_in_fp32: Megatron-LM forces it on for bf16, NeMo 2.0's performance mode turns it off; Apex's
    distributed_fused_adam: grad_sync_dtype); None: the profile's."""
    fsdp_defer_grad_sync: Optional[bool] = None
    """FSDP2 accumulating micro-batches reduce-scatters only the last one's gradients, holding them unsharded until
    then (the harness, KempnerForge), or false: every micro-batch's (torchtitan without HSDP, NeMo AutoModel's
    defer_fsdp_grad_sync: False); None: the profile's."""
    grad_bucket_params: Optional[int] = None
    """Parameters per gradient bucket of megatron-core's DistributedDataParallel, each bucket reduced (and, with the
    distributed optimizer, gathered) by its own collective (NeMo 2.0's comm-overlap callback sets 128·2^20); None:
    megatron-core's default, max(40M, 1M × data-parallel ranks)."""
    cross_entropy_loss_fusion: Optional[bool] = None
    """Megatron's vocab-parallel loss ran fused (megatron-core's cross_entropy_loss_fusion: on in NeMo 2.0's
    GPTConfig, off by default in Megatron-LM); None: the profile's."""
    pp_partition: Optional[str] = None
    """How the run split its blocks over pipeline stages (megatron | type:transformer | type:transformer|embedding:
    software.PP_PARTITIONS, DeepSpeed's partition_method names); None: the profile's."""
    job_hours: float = 24.0
    """Wall time of the job whose goodput `estimate` and `plan` predict (costmodel/resilience.py)."""
    checkpoint_every_steps: int = 0
    """Steps between checkpoints for that prediction; 0: the Young/Daly optimum."""
    restart_overhead_s: float = 300.0
    """Time from a failure to training again, besides reading the checkpoint (detection, rescheduling, process
    group and model set-up): an assumption to replace with a site's measured figure."""


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
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    costmodel: CostModelConfig = field(default_factory=CostModelConfig)
    search: SearchConfig = field(default_factory=SearchConfig)


def register_schema() -> None:
    """Make the schema available to `conf/config.yaml` as `base_config`."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)
