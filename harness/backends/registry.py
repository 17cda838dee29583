"""Every parallel backend by name: where it lives and what it can do, in one torch-free table.

The checks, the cost model, the planner and `make_backend` all read this table (Lightning Fabric keeps
its strategies the same way, in `strategies/registry.py`), so adding a backend is one entry here, one
module beside this one and one YAML file in `conf/backend/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

PRECISIONS = ("fp32", "fp16", "bf16")
FSDP_SHARDINGS = ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard")
"""FSDP1's strategy names, mapped onto FSDP2 (harness/backends/fsdp.py)."""
OPTIMIZERS = ("auto", "adamw", "adamw_foreach", "adamw_fused", "apex_fused_adam", "deepspeed_fused_adam")
"""train.optimizer: implementations of the same AdamW update (GPT-3's betas), chosen for speed."""
FP16_SCALER_OPTIONS = ("initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale")
"""DeepSpeed's dynamic loss scaler; torch's GradScaler (fsdp) has the first two (no hysteresis, no floor)."""


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


PP_SCHEDULES: dict[str, PipelineSchedule] = {s.name: s for s in (
    PipelineSchedule("GPipe", "single"),
    PipelineSchedule("1F1B", "single", at_least_pp_micro_batches=True),
    PipelineSchedule("Interleaved1F1B", "looped", rounds=True),
    PipelineSchedule("LoopedBFS", "looped"),
    PipelineSchedule("InterleavedZeroBubble", "looped", rounds=True, split_backward=True),
    PipelineSchedule("ZBVZeroBubble", "v", split_backward=True),
)}
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

    @property
    def implementation_module(self) -> str:
        return self.implementation.partition(":")[0]


BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec(
        name="ddp", implementation="harness.backends.ddp:DDPBackend",
        summary="PyTorch DDP through Lightning Fabric", gradient_buckets=True),
    BackendSpec(
        name="fsdp", implementation="harness.backends.fsdp:FSDPBackend",
        summary="FSDP2 fully_shard and DTensor TP through Fabric's ModelParallelStrategy; with parallel.pp > 1 "
                "torch.distributed.pipelining schedules over the same stages",
        tensor_parallel=True, pipeline_parallel=True, interleaved_pipeline=True,
        shardings=FSDP_SHARDINGS,
        options=("sharding", "hybrid_shard_group", "prefetch_depth", "offload", "param_dtype", "reduce_dtype",
                 "pp_schedule", *FP16_SCALER_OPTIONS[:2]),
        pipeline_implementation="harness.backends.pipeline:FSDPPipelineBackend"),
    BackendSpec(
        name="deepspeed", implementation="harness.backends.deepspeed:DeepSpeedBackend",
        summary="DeepSpeed ZeRO 0-3 (with ZeRO-Offload)",
        zero_stages=(0, 1, 2, 3),
        options=("offload_optimizer", "offload_param", *FP16_SCALER_OPTIONS, "ds_config"),
        deepspeed_engine=True),
    BackendSpec(
        name="deepspeed3d", implementation="harness.backends.deepspeed3d:DeepSpeed3DBackend",
        summary="DeepSpeed pipeline engine with megatron-core tensor parallelism (3D, ZeRO-1)",
        tensor_parallel=True, pipeline_parallel=True,
        zero_stages=(0, 1),
        zero_stage_note="DeepSpeed's pipeline engine supports ZeRO-1 only",
        options=(*FP16_SCALER_OPTIONS, "ds_config"),
        deepspeed_engine=True, builds_own_stages=True, sequence_parallel_equal_shards=True),
)}


def backend_spec(name: str) -> BackendSpec:
    return BACKENDS[name]


def fsdp_replica_group(sharding: str, hybrid_shard_group: Optional[int], devices_per_node: int,
                       dp: int) -> int:
    """Ranks that shard one replica: all data-parallel ranks, one (no_shard), or under hybrid_shard the
    group named by backend.hybrid_shard_group (default: one node's devices)."""
    if sharding == "no_shard":
        return 1
    if sharding == "hybrid_shard":
        return hybrid_shard_group if hybrid_shard_group is not None else devices_per_node
    return dp


def resolve_optimizer(choice: str, backend: str, device_type: str) -> str:
    """The AdamW implementation `train.optimizer` means for this backend on this device: `auto` is DeepSpeed's
    fused Adam on a GPU (what DeepSpeed users benchmark), torch's AdamW otherwise."""
    if choice != "auto":
        return choice
    return "deepspeed_fused_adam" if backend_spec(backend).deepspeed_engine and device_type == "cuda" else "adamw"
