"""Every parallel backend by name: where it lives and what it can do, in one torch-free table.

The checks, the cost model, the planner and `make_backend` all read this table (Lightning Fabric keeps
its strategies the same way, in `strategies/registry.py`), so adding a backend is one entry here, one
module beside this one and one YAML file in `conf/backend/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

PRECISIONS = ("fp32", "fp16", "bf16")
FSDP_SHARDINGS = ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard")
"""FSDP1's strategy names, mapped onto FSDP2 (harness/backends/fsdp.py)."""
NIC_PATHS = ("LOC", "NVL", "NVB", "C2C", "PIX", "PXB", "PXN", "PHB", "SYS")
"""NCCL's path types from a GPU to a NIC, nearest first (NVIDIA/nccl src/graph/topo.h `PATH_LOC` ... `PATH_SYS`; what
`nvidia-smi topo -m` prints between a GPU and its NIC: PIX, PXB, PHB, SYS)."""
OPTIMIZERS = ("auto", "adamw", "adamw_foreach", "adamw_fused", "apex_fused_adam", "deepspeed_fused_adam")
"""train.optimizer: implementations of the same AdamW update (GPT-3's betas), chosen for speed."""
FP16_SCALER_OPTIONS = ("initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale")
"""DeepSpeed's dynamic loss scaler; torch's GradScaler (fsdp) has the first two (no hysteresis, no floor)."""


@dataclass(frozen=True)
class CheckpointMode:
    """One `train.activation_checkpointing` mode: the part of every block whose activations the backward pass
    recomputes from the part's input instead of storing them, named by the model's own modules."""

    name: str
    region: str
    """What each block recomputes: "" nothing, "attn.core" its core attention (QKᵀ, softmax, ·V), "attn" its
    attention sub-layer (the projections too), "block" the whole block."""
    meaning: str
    tp_collectives: int
    """Tensor-parallel collectives its recomputed forward runs again per block (one per row-parallel linear)."""
    gemm_calls: Optional[int]
    """GEMM kernels its recomputed forward runs again per block; None: every one of the block's."""


CHECKPOINTING: dict[str, CheckpointMode] = {mode.name: mode for mode in (
    CheckpointMode("none", "", "nothing is recomputed: every activation the backward needs is stored", 0, 0),
    CheckpointMode("selective", "attn.core", "core attention is recomputed from q, k and v: Korthikanti et al. "
                   "2022's selective recomputation (section 5); with train.checkpoint_every_n=n, every n-th whole "
                   "block instead", 0, 2),
    CheckpointMode("attention", "attn", "the attention sub-layer is recomputed from its input, its "
                   "projections too", 1, 4),
    CheckpointMode("full", "block", "every block is recomputed from its input (Chen et al. 2016)", 2, None),
)}
"""train.activation_checkpointing, from least to most recomputation (the planner's order)."""


@dataclass(frozen=True)
class PipelineSchedule:
    """A `torch.distributed.pipelining` schedule (backend.pp_schedule) and what it asks of the layout.

    `placement` is how its virtual stages sit on the pipeline ranks: one per rank (`single`), looped
    (rank r holds r, r+pp, ...: Megatron's interleaving) or `v` (rank r holds r and 2pp-1-r).
    The micro-batch rules are torch's own (`torch/distributed/pipelining/schedules.py`), checked before launch.
    """

    name: str
    placement: str
    at_least_pp_micro_batches: bool = False
    """Needs at least as many micro-batches as pipeline stages (1F1B's warm-up)."""
    rounds: bool = False
    """Needs micro-batches divisible by max(1, micro-batches // pp) (torch's interleaved rounds)."""
    split_backward: bool = False
    """Runs each backward as an input-gradient pass and a later weight-gradient pass (zero bubble)."""
    idle_share: float = 1.0
    """Its idle time as a share of interleaved 1F1B's (p-1)/(v m): see `bubble`."""
    holds_all_micro_batches: bool = False
    """Runs every micro-batch's forward before the backwards, so the first stage holds all of their activations
    (1F1B and the zero-bubble schedules hold at most pp)."""

    def bubble(self, pp: int, vpp: int, micro_batches: int) -> float:
        """Idle time of the schedule relative to its work, with forward, input-gradient and weight-gradient passes
        of equal cost (the zero-bubble papers' assumption; a full backward is the latter two):

        - GPipe and 1F1B (Narayanan et al. 2021, sec. 2.2): (p-1)/m.
        - Interleaved 1F1B and looped breadth-first (Lamy-Poirier 2023): (p-1)/(v m).
        - Interleaved zero bubble, ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"): weight-gradient
          passes fill the cool-down, leaving (p-1)(F+B-W) of idle per rank: a third of 1F1B's, (p-1)/(3 v m).
        - ZB-V (Qi et al. 2024, "Pipeline Parallelism with Controllable Memory"): (p-1)(F+B-2W) = 0, given at
          least 2p-1 micro-batches to fill its V (fewer leave idle slots this does not count).
        """
        return 0.0 if pp == 1 else self.idle_share * (pp - 1) / (vpp * micro_batches)


PP_SCHEDULES: dict[str, PipelineSchedule] = {s.name: s for s in (
    PipelineSchedule("GPipe", "single", holds_all_micro_batches=True),
    PipelineSchedule("1F1B", "single", at_least_pp_micro_batches=True),
    PipelineSchedule("Interleaved1F1B", "looped", rounds=True),
    PipelineSchedule("LoopedBFS", "looped", holds_all_micro_batches=True),
    PipelineSchedule("InterleavedZeroBubble", "looped", rounds=True, split_backward=True, idle_share=1 / 3),
    PipelineSchedule("ZBVZeroBubble", "v", split_backward=True, idle_share=0.0),
)}


def pipeline_bubble(schedule: str, pp: int, vpp: int, micro_batches: int) -> float:
    """The bubble of the schedule named (PipelineSchedule.bubble)."""
    return PP_SCHEDULES[schedule].bubble(pp, vpp, micro_batches)
"""The schedules `backend=fsdp parallel.pp>1` runs (parity-tested on gloo). torch's DualPipeV is left out: it
is built for overlapping a MoE model's all-to-all with its own forward/backward callbacks."""


def pipeline_split(n_layers: int, stages: int) -> Optional[list[range]]:
    """The blocks of each pipeline stage, or None if `n_layers` blocks cannot be split over `stages` evenly.

    Blocks split evenly when they divide; otherwise, if n_layers + 2 divides, the embedding and the output
    layer each take one block's place (megatron-core's `account_for_embedding_in_pipeline_split` and
    `account_for_loss_in_pipeline_split`): 2 blocks on 4 stages are [embedding], [block 0], [block 1], [head].
    """
    if n_layers % stages == 0:
        per = n_layers // stages
        return [range(s * per, (s + 1) * per) for s in range(stages)]
    if (n_layers + 2) % stages == 0:
        per = (n_layers + 2) // stages  # slot 0 is the embedding, slot n_layers + 1 the output layer
        return [range(max(0, s * per - 1), min(n_layers, (s + 1) * per - 1)) for s in range(stages)]
    return None


def resolve_pp_schedule(choice: Optional[str], vpp: int) -> str:
    """The schedule backend.pp_schedule means: the one named, else 1F1B, or Megatron's interleaved 1F1B when
    each rank holds more than one stage."""
    return choice or ("1F1B" if vpp == 1 else "Interleaved1F1B")


@dataclass(frozen=True)
class ContextParallel:
    """One `parallel.cp_kind`: how the ranks of a context-parallel group share each sequence, what it asks of the
    model's shapes, and where it runs."""

    name: str
    meaning: str
    splits_heads: bool
    """Attention runs on whole sequences of 1/cp of the heads (all-to-all before and after): the query and KV head
    counts (after tensor parallelism) must divide by cp."""
    load_balanced: bool
    """Each rank holds two of 2·cp sequence chunks (one early, one late) so causal attention's work is even: the
    sequence must divide by 2·cp."""
    runs_on: tuple[str, ...]
    """Devices (system.device) whose attention kernels it can drive."""
    run_note: str
    """Why it runs only there, for the error that refuses another."""
    source: str


CP_KINDS: dict[str, ContextParallel] = {k.name: k for k in (
    ContextParallel("ulysses", "all-to-all over attention heads: each rank attends whole sequences for cp-th of the "
                    "heads, then a second all-to-all returns its sequence chunk (DeepSpeed-Ulysses)", True, False,
                    ("cpu", "cuda"), "",
                    "Jacobs et al. 2023, arXiv 2309.14509; deepspeed.sequence.layer.DistributedAttention"),
    ContextParallel("ring", "ring attention: each rank keeps its queries and passes its K/V blocks around the ring, "
                    "attending block by block with an online softmax, the transfer overlapped with the block's "
                    "attention", False, True, ("cuda",),
                    "torch's context_parallel rings the CUDA SDPA kernels (flash, efficient, cuDNN) only; on a CPU "
                    "use parallel.cp_kind=ulysses",
                    "Liu et al. 2023, arXiv 2310.01889; torch.distributed.tensor.experimental.context_parallel "
                    "(torchtitan's CP)"),
)}
"""parallel.cp_kind."""


@dataclass(frozen=True)
class BackendSpec:
    """One backend: its implementation and the abilities `validate` holds a config to before launch."""

    name: str
    implementation: str
    """`module:Class` of its `harness.backends.base.Backend`, imported only when a rank builds it."""
    summary: str
    tensor_parallel: bool = False
    pipeline_parallel: bool = False
    interleaved_pipeline: bool = False
    """Runs more than one virtual stage per rank (parallel.vpp > 1)."""
    zero_stages: tuple[int, ...] = (0,)
    precisions: tuple[str, ...] = PRECISIONS
    shardings: tuple[str, ...] = ()
    """FSDP-style strategies chosen by backend.sharding; empty: the backend shards by ZeRO stage."""
    options: tuple[str, ...] = ()
    """The `backend.*` keys it reads besides `name`; setting another backend's key is refused."""
    deepspeed_engine: bool = False
    """Trains through `deepspeed.initialize`: 16-bit weights with fp32 master copies in the optimizer, and
    ZeRO's gradient reduction even over a one-rank data-parallel group."""
    gradient_buckets: bool = False
    """Keeps a flat gradient copy for its all-reduce buckets (PyTorch DDP's reducer)."""
    zero_stage_note: str = ""
    """Why its ZeRO stages are what they are, for the error that refuses another."""
    builds_own_stages: bool = False
    """Builds its layers itself (pipeline stages), so train.compile and train.checkpoint_every_n do not apply."""
    sequence_parallel_equal_shards: bool = False
    """Sequence parallelism needs seq_len divisible by tp (megatron-core splits the sequence in equal shards)."""
    pipeline_implementation: str = ""
    """`module:Class` that runs it when parallel.pp > 1, if not `implementation` itself."""
    context_parallel: tuple[str, ...] = ()
    """parallel.cp_kind values it runs with parallel.cp > 1 (CP_KINDS); empty: no context parallelism."""
    software: str = ""
    """The cost model's software profile of this backend (harness/costmodel/software.py PROFILES): what it fuses
    and overlaps, used when costmodel.software names no other."""

    @property
    def implementation_module(self) -> str:
        return self.implementation.partition(":")[0]


BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec(
        name="ddp", software="harness-ddp", implementation="harness.backends.ddp:DDPBackend",
        summary="PyTorch DDP through Lightning Fabric", gradient_buckets=True, context_parallel=tuple(CP_KINDS)),
    BackendSpec(
        name="fsdp", software="harness-fsdp", implementation="harness.backends.fsdp:FSDPBackend",
        summary="FSDP2 fully_shard and DTensor TP through Fabric's ModelParallelStrategy; with parallel.pp > 1 "
                "torch.distributed.pipelining schedules over the same stages",
        tensor_parallel=True, pipeline_parallel=True, interleaved_pipeline=True,
        shardings=FSDP_SHARDINGS, context_parallel=tuple(CP_KINDS),
        options=("sharding", "hybrid_shard_group", "prefetch_depth", "offload", "param_dtype", "reduce_dtype",
                 "pp_schedule", *FP16_SCALER_OPTIONS[:2]),
        pipeline_implementation="harness.backends.pipeline:FSDPPipelineBackend"),
    BackendSpec(
        name="deepspeed", software="harness-deepspeed", implementation="harness.backends.deepspeed:DeepSpeedBackend",
        summary="DeepSpeed ZeRO 0-3 (with ZeRO-Offload)",
        zero_stages=(0, 1, 2, 3),
        options=("offload_optimizer", "offload_param", *FP16_SCALER_OPTIONS, "ds_config"),
        deepspeed_engine=True),
    BackendSpec(
        name="deepspeed3d", software="harness-deepspeed3d",
        implementation="harness.backends.deepspeed3d:DeepSpeed3DBackend",
        summary="DeepSpeed pipeline engine with megatron-core tensor parallelism (3D, ZeRO-1)",
        tensor_parallel=True, pipeline_parallel=True,
        zero_stages=(0, 1),
        zero_stage_note="DeepSpeed's pipeline engine supports ZeRO-1 only",
        options=(*FP16_SCALER_OPTIONS, "ds_config"),
        deepspeed_engine=True, builds_own_stages=True, sequence_parallel_equal_shards=True),
)}


def backend_spec(name: str) -> BackendSpec:
    return BACKENDS[name]


@dataclass(frozen=True)
class FrameworkLayouts:
    """The layouts another framework runs itself, beyond what the harness's backend for its kind of run does: a
    prediction of that framework's run (costmodel.software names its profile) accepts them (checks.validate)."""

    interleaved_pipeline: bool = False
    """It runs interleaved pipeline stages (parallel.vpp > 1), splitting the blocks evenly over pp·vpp stages (or
    over pp·vpp after counting the embedding and the loss as one block each)."""
    context_parallel: tuple[str, ...] = ()
    """parallel.cp_kind values it runs with parallel.cp > 1, beside pipeline stages too."""
    source: str = ""


FRAMEWORK_LAYOUTS: dict[str, FrameworkLayouts] = {
    "megatron-lm": FrameworkLayouts(
        interleaved_pipeline=True, context_parallel=("ring",),
        source="megatron-core: --num-layers-per-virtual-pipeline-stage (the interleaved 1F1B schedule, "
               "megatron/core/pipeline_parallel/schedules.py) and --context-parallel-size, whose default cp_comm_type "
               "p2p passes KV chunks around a ring with a load-balanced split, beside TP, PP and DP"),
    "megatron-lm-2021": FrameworkLayouts(
        interleaved_pipeline=True,
        source="Narayanan et al. 2021, section 2.2.2: the interleaved schedule (no context parallelism yet)"),
    "megatron-deepspeed": FrameworkLayouts(source="DeepSpeed's pipeline engine: one stage per rank, no CP"),
    "nanotron": FrameworkLayouts(source="nanotron's 1F1B and all-forward-all-backward engines, no CP"),
    "kempnerforge": FrameworkLayouts(source="predicted with the harness's FSDP backend's own layouts"),
    "pytorch-autocast-script": FrameworkLayouts(source="one process"),
}
"""Every cost-model profile that no backend runs (harness/costmodel/software.py PROFILES), by name."""


def fsdp_replica_group(sharding: str, hybrid_shard_group: Optional[int], devices_per_node: int,
                       dp: int, tp: int = 1) -> int:
    """Ranks that shard one replica: all data-parallel ranks, one (no_shard), or under hybrid_shard the
    group named by backend.hybrid_shard_group (default: the data-parallel ranks of one node, devices_per_node / tp
    with TP fastest in the rank order, so a replica's shards talk over the node's links, not its NICs)."""
    if sharding == "no_shard":
        return 1
    if sharding == "hybrid_shard":
        return hybrid_shard_group if hybrid_shard_group is not None else max(1, devices_per_node // tp)
    return dp


def resolve_optimizer(choice: str, backend: str, device_type: str) -> str:
    """The AdamW implementation `train.optimizer` means for this backend on this device: `auto` is DeepSpeed's
    fused Adam on a GPU (what DeepSpeed users benchmark), torch's AdamW otherwise."""
    if choice != "auto":
        return choice
    return "deepspeed_fused_adam" if backend_spec(backend).deepspeed_engine and device_type == "cuda" else "adamw"


@dataclass(frozen=True)
class ReportView:
    """One view of `harness report` (and of an experiment's report.views): its table's builder and its plot, as
    `module:function`, imported when the report draws it (pandas and matplotlib only then)."""

    name: str
    summary: str
    build: str
    plot: str
    profiled: bool = False
    """Reads the breakdown of profiled runs (profile.enabled=true); left out where no run was profiled."""


REPORT_VIEWS: dict[str, ReportView] = {v.name: v for v in (
    ReportView("sweep", "metrics against the swept key", "harness.report.views:sweep_view",
               "harness.report.plots:plot_sweep"),
    ReportView("compare", "layouts or backends side by side, against a baseline", "harness.report.views:compare_view",
               "harness.report.plots:plot_compare"),
    ReportView("scaling", "throughput and efficiency against devices, with the ideal",
               "harness.report.views:scaling_view", "harness.report.plots:plot_scaling"),
    ReportView("prediction", "predicted next to measured, with the error", "harness.report.views:prediction_view",
               "harness.report.plots:plot_prediction"),
    ReportView("power", "power and energy per step", "harness.report.views:power_view",
               "harness.report.plots:plot_power"),
    ReportView("projection", "a full training run's time and energy from each run's rate",
               "harness.report.views:projection_view", "harness.report.plots:plot_projection"),
    ReportView("breakdown", "where the step's time goes: compute, communication, overlap, idle",
               "harness.report.views:breakdown_view", "harness.report.plots:plot_breakdown", profiled=True),
    ReportView("comm", "communication by collective kind, measured against predicted", "harness.report.views:comm_view",
               "harness.report.plots:plot_comm", profiled=True),
    ReportView("ranks", "each rank's traced step: compute, time in collectives (waiting included), idle; stragglers",
               "harness.report.views:ranks_view", "harness.report.plots:plot_ranks", profiled=True),
    ReportView("context", "tokens/s and memory against sequence length, per context-parallel degree and kind",
               "harness.report.views:context_view", "harness.report.plots:plot_context"),
    ReportView("checkpoint", "checkpoint save and load time, size and bandwidth, beside the predicted write, goodput",
               "harness.report.views:checkpoint_view", "harness.report.plots:plot_checkpoint"),
)}
"""In report order."""


def load(path: str) -> Any:
    """The object a `module:name` entry of these tables names, imported on use."""
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
