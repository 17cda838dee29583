"""What the cost model needs to know about a job, read once from a config: shapes, sharding, software.

Every other costmodel module takes a `Job`, so the reading of config fields (with defaults for the
backend options other branches add: `backend.sharding`, `backend.offload`) lives in one place.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Optional

from harness.config.checks import compute_precision, reduce_precision
from harness.core.layout import Layout
from harness.core.registry import (
    PP_SCHEDULES,
    BackendSpec,
    backend_spec,
    fsdp_replica_group,
    pipeline_split,
    resolve_pp_schedule,
)
from harness.costmodel.flops import param_count, param_tensors, shape_cached
from harness.costmodel.software import TP_VOCAB, Software, VocabUnderTP, software_for
from harness.models.config import GPTConfig

ACT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DS_REDUCE_BUCKET_SIZE = 500_000_000
"""DeepSpeed's zero_optimization.reduce_bucket_size default, in elements (deepspeed/runtime/zero/config.py)."""
FSDP_REDUCE_BYTES = 4.0
"""FSDP2's gradient reduce dtype, fp32 (MixedPrecisionPolicy(reduce_dtype=torch.float32) in the harness's
backend, backend.reduce_dtype's default, and in KempnerForge's)."""


@dataclass(frozen=True)
class Zero3:
    """DeepSpeed ZeRO-3's knobs that decide how often a parameter is gathered, with DeepSpeed's defaults
    (deepspeed/runtime/zero/config.py; read from `backend.ds_config.zero_optimization.stage3_*`, or from the field
    names DeepSpeed's config model also accepts, `max_reuse_distance` and the like: populate_by_name)."""

    param_persistence_threshold: int = 100_000
    model_persistence_threshold: int = 2**63 - 1
    max_reuse_distance: int = 1_000_000_000
    prefetch_bucket_size: int = 50_000_000

    @classmethod
    def from_ds_config(cls, ds_config: Any) -> "Zero3":
        zero = dict((ds_config or {}).get("zero_optimization", {}) or {})
        given = {f: zero.get(f"stage3_{f}", zero.get(f)) for f in cls.__dataclass_fields__}
        return cls(**{f: int(v) for f, v in given.items() if v is not None})


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of each model state before sharding."""

    weights: float
    grads: float
    optimizer: float


def state_bytes_per_param(backend: str, precision: str) -> StateBytes:
    """DeepSpeed keeps 16-bit weights and fp32 master copies; PyTorch autocast keeps fp32 weights."""
    if precision == "fp32" or not backend_spec(backend).deepspeed_engine:
        return StateBytes(weights=4, grads=4, optimizer=8)  # Adam momentum + variance
    return StateBytes(weights=2, grads=2, optimizer=12)  # fp32 master + momentum + variance (K = 12)


@dataclass(frozen=True)
class Shards:
    """How many ranks share each model state (1: every rank holds all of it; 0 divisor means offloaded)."""

    weights: int
    grads: int
    optimizer: int


def shard_degrees(job: "Job") -> Shards:
    """How many ranks share each model state: FSDP's replica group, or ZeRO's data-parallel ranks by stage."""
    dp = job.grad_ranks
    if job.spec.shardings:
        if job.sharding not in job.spec.shardings:
            raise ValueError(f"backend.sharding={job.sharding}: choose one of {', '.join(job.spec.shardings)}")
        n = job.fsdp_group
        return Shards(n, n, n)
    stage = job.layout.zero_stage
    return Shards(weights=dp if stage >= 3 else 1, grads=dp if stage >= 2 else 1, optimizer=dp if stage >= 1 else 1)


@dataclass(frozen=True)
class Job:
    """One training job as the cost model sees it."""

    model: GPTConfig
    layout: Layout
    backend: str
    """A name in `harness.core.registry.BACKENDS`; what it can do is `spec`."""
    sharding: str
    """FSDP strategy (fsdp only): full_shard | shard_grad_op | hybrid_shard | no_shard."""
    offload: bool
    """Parameters, gradients and optimizer state live in host memory (FSDP CPU offload)."""
    precision: str
    checkpointing: str
    sequence_parallel: bool
    vpp: int
    devices_per_node: int
    software: Software = Software()
    zero3: Zero3 = Zero3()
    ds_overlap_comm: Optional[bool] = None
    """DeepSpeed's zero_optimization.overlap_comm as configured (None: DeepSpeed's default)."""
    ds_bucket_allreduce: bool = True
    """DeepSpeed's zero_optimization.use_multi_rank_bucket_allreduce (default on): where the software runs
    DeepSpeed's ZeRO-1/2 optimizer (Software.zero_bucket_allreduce), each gradient bucket is all-reduced whole
    (stage_1_and_2.py average_tensor), not reduced to the ranks that own its partitions."""
    ds_reduce_bucket: Optional[int] = DS_REDUCE_BUCKET_SIZE
    """Elements of ZeRO-1/2's contiguous gradient bucket (zero_optimization.reduce_bucket_size; None with
    contiguous_gradients off)."""
    checkpoint_every_n: Optional[int] = None
    """With selective checkpointing: every n-th whole block is checkpointed instead of attention."""
    hybrid_shard_group: Optional[int] = None
    """backend.hybrid_shard_group (fsdp hybrid_shard); None: one node's data-parallel ranks (devices / TP)."""
    pp_schedule: str = "1F1B"
    """The pipeline schedule (backend.pp_schedule for fsdp; DeepSpeed's pipeline engine runs 1F1B)."""
    cp_kind: str = "ulysses"
    """How the layout's cp ranks share a sequence (parallel.cp_kind; harness.core.registry.CP_KINDS)."""
    device: str = "cuda"
    """The system's device type (system.device: cuda, rocm, xpu, cpu): which kernels a framework's operators run
    as (a native norm's backward is one pass over rows on a CPU, two kernels on a GPU)."""
    reduce_bytes: float = FSDP_REDUCE_BYTES
    """Bytes per element FSDP reduces gradients in (backend.reduce_dtype: the reduce-scatter's input buffer, the
    unsharded gradients held while accumulating, the bytes on the wire); ZeRO-3's unsharded block gradient too."""

    @functools.cached_property
    def spec(self) -> BackendSpec:
        return backend_spec(self.backend)

    # Placement: derived once per Job, read by memory, communication and timing alike.
    @functools.cached_property
    def params_per_rank(self) -> float:
        """Parameters the pipeline rank that holds the most holds, before data-parallel sharding."""
        return max(self.stage_params)

    @property
    def stage_params(self) -> tuple[float, ...]:
        """Parameters each pipeline rank holds, before data-parallel sharding (stage_loads places the blocks)."""
        return _stage_params(self.model, self.layout.tp, stage_loads(self), self.vocab)

    @property
    def block_params_per_rank(self) -> float:
        """One transformer block's parameters on one TP rank (what FSDP gathers per block, before sharding)."""
        return _block_params(self.model, self.layout.tp)

    @property
    def root_params_per_rank(self) -> float:
        """Parameters outside the blocks on the pipeline rank that holds the most (the embedding, final norm and
        output layer, each as TP splits it or not): what FSDP's root module, the last `fully_shard`, holds."""
        params = self.stage_params
        most = params.index(max(params))  # the rank params_per_rank counts
        return max(0.0, params[most] - stage_loads(self)[most][0] * self.block_params_per_rank)

    @property
    def vocab_mode(self) -> str:
        """How this job's vocabulary-sized layers run under TP (software.TP_VOCAB)."""
        untied = self.software.tp_vocab_untied
        if untied and not self.model.tie_embeddings and self.layout.pp == 1:
            return untied
        return self.software.tp_vocab

    @property
    def vocab(self) -> VocabUnderTP:
        return TP_VOCAB[self.vocab_mode]

    @property
    def vocab_per_rank(self) -> tuple[float, float]:
        """(output-layer columns, loss columns) one TP rank computes per token."""
        v, tp, how = self.model.vocab_size, self.layout.tp, self.vocab
        return (v / tp if how.head_split else v), (v / tp if how.loss_split else v)

    @functools.cached_property
    def state_bytes(self) -> StateBytes:
        if self.software.states_in_compute_dtype and self.precision in ("bf16", "fp16"):
            E = ACT_BYTES[self.precision]  # weights, gradients and Adam's two moments, all 16-bit
            return StateBytes(weights=E, grads=E, optimizer=2 * E)
        states = state_bytes_per_param(self.backend, self.precision)
        if self.software.fp32_grads_in_bf16 and self.precision == "bf16":
            return dataclasses.replace(states, grads=4)
        return states

    @functools.cached_property
    def shards(self) -> Shards:
        return shard_degrees(self)

    @property
    def grad_ranks(self) -> int:
        """Ranks that hold the same parameters and reduce their gradients together: every data- and
        context-parallel rank of a stage's TP slice."""
        return self.layout.dp * self.layout.cp

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch on one rank: the micro-batch's sequences, cut in cp chunks."""
        return self.layout.micro_batch_size * self.model.seq_len // self.layout.cp

    @property
    def fsdp_group(self) -> int:
        """Ranks that shard one FSDP replica, by the rule the run itself uses."""
        return fsdp_replica_group(self.sharding, self.hybrid_shard_group, self.devices_per_node, self.grad_ranks,
                                  self.layout.tp)

    @property
    def checkpoint_modes(self) -> dict[str, float]:
        """The share of blocks under each checkpointing mode (every n-th block: full, the rest: none)."""
        if self.checkpointing == "selective" and self.checkpoint_every_n:
            full = (self.model.n_layers // self.checkpoint_every_n) / self.model.n_layers
            return {"full": full, "none": 1.0 - full}
        return {self.checkpointing: 1.0}

    @property
    def grad_reduce_overlap(self) -> bool:
        """Whether gradient reduction runs during the backward: the profile's mechanism, or for DeepSpeed's ZeRO
        its `overlap_comm` (default on for stage 3 only, deepspeed/runtime/zero/config.py)."""
        if self.software.zero_reduce_after_backward and self.layout.zero_stage >= 1:
            return False
        if self.software.grad_reduce_overlap is not None:
            return self.software.grad_reduce_overlap
        return self.ds_overlap_comm if self.ds_overlap_comm is not None else self.layout.zero_stage == 3

    @property
    def micro_batches(self) -> int:
        """Micro-batches each data-parallel replica runs per optimizer step (its cp ranks run them together)."""
        return self.layout.global_batch_size // (self.layout.micro_batch_size * self.layout.dp)

    @property
    def act_bytes(self) -> int:
        return ACT_BYTES[self.precision]

    @property
    def autocast(self) -> bool:
        """The run computes in 16 bits under torch.autocast over fp32 weights (the software's `autocast_casts`)."""
        return self.software.autocast_casts and self.act_bytes < 4

    @property
    def stream_bytes(self) -> int:
        """Bytes per element of the residual stream. Under autocast it is fp32: the embedding's weights stay fp32,
        a 16-bit branch added to the fp32 stream promotes to fp32, and autocast runs layer_norm in fp32 (PyTorch's
        autocast op reference: layer_norm is on the CUDA float32 list), so the norms read, write and save 4 bytes
        and each norm's output is cast to the compute dtype for the linear after it. Otherwise the compute
        dtype's."""
        return 4 if self.autocast else self.act_bytes

    @property
    def unsharded_grad_bytes(self) -> Optional[float]:
        """Bytes per parameter of the unsharded gradients FSDP2 holds between micro-batches; None where gradients
        stay sharded. Accumulating without gradient sync (set_requires_gradient_sync(False): the harness through
        Fabric's no_backward_sync and torch's pipeline stages, KempnerForge through maybe_no_sync) keeps every
        parameter's whole gradient on its rank, cast up to the reduce dtype (torch FSDPParam.
        to_accumulated_grad_if_needed), until the last micro-batch's backward reduce-scatters it. A one-rank group
        too, where FSDP2 wraps the run (fsdp_wraps); not where the software reduces every micro-batch's
        (fsdp_reduces_every_micro_batch)."""
        if self.fsdp_wraps and self.sharding != "no_shard" and self.micro_batches > 1 \
                and not self.fsdp_reduces_every_micro_batch:
            return self.reduce_bytes
        return None

    @property
    def fsdp_reduces_every_micro_batch(self) -> bool:
        """FSDP2 accumulating micro-batches reduces each one's gradients and accumulates their shards, where the
        software does not defer it (Software.fsdp_defers_grad_sync); never in torch's pipeline stages, which always
        do (pipelining/stage.py backward_maybe_with_nosync sets set_requires_gradient_sync(False) and
        perform_reduce_grad reduces once)."""
        return (self.fsdp_wraps and self.micro_batches > 1 and self.layout.pp == 1
                and not self.software.fsdp_defers_grad_sync)

    @property
    def ring_cp(self) -> bool:
        """Context parallelism passes K and V around a ring (parallel.cp_kind=ring with cp > 1), not all-to-alls."""
        return self.layout.cp > 1 and self.cp_kind == "ring"

    @property
    def fsdp_wraps(self) -> bool:
        """FSDP2 wraps the model: every FSDP run, on a one-rank group too (a TP-only mesh, where KempnerForge gives
        its mesh a dp_shard dimension of size 1 beside TP: kempnerforge/distributed/setup.py init_distributed), but
        not one device where the software builds no mesh there (Software.fsdp_on_one_device)."""
        return bool(self.spec.shardings) and (self.software.fsdp_on_one_device or self.layout.world_size > 1)

    @property
    def ddp_buckets(self) -> bool:
        """PyTorch DDP reduces this rank's gradients bucket by bucket: a bucketing backend with more than one rank
        to reduce over."""
        return bool(self.spec.gradient_buckets) and self.grad_ranks > 1

    @property
    def embedding_rows(self) -> float:
        """Vocabulary rows of the token embedding one TP rank holds (all of them where the software keeps it whole:
        software.TP_VOCAB)."""
        return self.model.vocab_size / (self.layout.tp if self.vocab.embedding_split else 1)

    @property
    def fsdp_units(self) -> int:
        """FSDP2's units on the rank that holds the most blocks, each gathered and reduced as one collective: one
        `fully_shard` per block, and the root's own parameters. Pipeline stages are each a root of their own
        (harness/backends/pipeline.py shards each stage module), and only the stages holding the embedding (rank
        0) or the output layer have parameters outside their blocks."""
        rank, (blocks, last) = most_blocks(self)
        return blocks + 1 if self.layout.pp == 1 else blocks + (rank == 0) + last

    @property
    def fsdp_gathers(self) -> int:
        """How many times a step gathers each FSDP unit: for the forward and the backward of every micro-batch where
        units reshard after the forward, once per micro-batch where they do not; in torch's pipeline stages, which
        keep units gathered after each backward (keeps_units_gathered), m + 1 (the backwards', and the forwards'
        that follow a forward: the warm-up's and the first of the steady state) where they reshard after the
        forward, and once per step where they do not (the zero-bubble schedules). The harness's FSDP pipeline on 4
        CPU ranks (pp 2 × dp 2, 4 micro-batches, 1F1B) all-gathers 5/4 of one gather per micro-batch
        (harness.predict.commcount)."""
        m = self.micro_batches
        if self.layout.pp > 1:
            return 1 if PP_SCHEDULES[self.pp_schedule].split_backward else m + 1
        return m if self.keeps_units_gathered else 2 * m

    @property
    def keeps_units_gathered(self) -> bool:
        """FSDP keeps every unit's parameters gathered from one use to the next, so each is gathered about once per
        micro-batch and all of them are gathered at once: the harness reshards after the forward only under
        full_shard and hybrid_shard (harness/backends/fsdp.py), and never in zero-bubble pipeline stages
        (harness/backends/pipeline.py); and torch's pipeline stages run every backward with
        `set_reshard_after_backward(False)` (torch/distributed/pipelining/stage.py), so a stage's units stay
        gathered from each backward to the next forward, which finds them so (a step gathers each about m + 1
        times, not 2m) and at a backward's end holds all of them."""
        return self.fsdp_wraps and (self.sharding in ("shard_grad_op", "no_shard") or self.layout.pp > 1)


def _ds_reduce_bucket(zero: dict[str, Any], ds_config: Any, precision: str, stage: int) -> Optional[int]:
    """Elements of the gradient bucket DeepSpeed's ZeRO optimizer preallocates; None where it runs none: with
    contiguous_gradients off, or where bf16 ZeRO-1 with fp32 gradient accumulation (data_types.grad_accum_dtype)
    runs DeepSpeed's BF16_Optimizer instead (deepspeed/runtime/engine.py _do_optimizer_sanity_check)."""
    accumulate = str(((ds_config or {}).get("data_types") or {}).get("grad_accum_dtype", "")).lower()
    if not zero.get("contiguous_gradients", True) or (
            precision == "bf16" and stage == 1 and accumulate in ("fp32", "float32", "float")):
        return None
    return int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET_SIZE))


def job_from_config(cfg: Any, layout: Layout, software: Optional[Software] = None) -> Job:
    """The job `cfg` describes on `layout`, predicted under `software` (default: the profile `cfg` selects)."""
    backend = cfg.backend
    ds_config = getattr(backend, "ds_config", None)
    zero = (ds_config or {}).get("zero_optimization") or {}
    schedule = resolve_pp_schedule(getattr(backend, "pp_schedule", None), cfg.parallel.vpp)
    sharding = backend.sharding
    if layout.pp > 1 and sharding == "full_shard" and PP_SCHEDULES[schedule].split_backward:
        # Zero-bubble stages keep parameters gathered (harness/backends/pipeline.py); under hybrid_shard too,
        # which the memory model does not distinguish from its resharding form.
        sharding = "shard_grad_op"
    return Job(
        model=GPTConfig.from_section(cfg.model),
        layout=layout,
        backend=backend.name,
        sharding=sharding,
        offload=backend.offload,
        precision=compute_precision(cfg),  # FSDP's param_dtype, where given: what the blocks compute and gather in
        checkpointing=cfg.train.activation_checkpointing,
        checkpoint_every_n=cfg.train.checkpoint_every_n,
        sequence_parallel=bool(cfg.parallel.sequence_parallel),
        vpp=cfg.parallel.vpp,
        devices_per_node=cfg.system.devices_per_node,
        software=software or software_for(cfg),
        zero3=Zero3.from_ds_config(ds_config),
        ds_overlap_comm=zero.get("overlap_comm"),
        ds_bucket_allreduce=bool(zero.get("use_multi_rank_bucket_allreduce", True)),
        ds_reduce_bucket=_ds_reduce_bucket(zero, ds_config, cfg.train.precision, layout.zero_stage),
        hybrid_shard_group=backend.hybrid_shard_group,
        pp_schedule=schedule,
        cp_kind=getattr(cfg.parallel, "cp_kind", "ulysses"),
        device=str(getattr(cfg.system, "device", "cuda")),
        reduce_bytes=ACT_BYTES[reduce_precision(cfg)],
    )




@dataclass(frozen=True)
class ParamSplit:
    """Parameters by where they live: one block, the input embeddings, and the rest (final norm, untied head)."""

    per_layer: int
    embedding: int
    head: int
    """Final norm plus the untied output projection (0 projection when tied)."""
    total: int


@shape_cached
def param_split(m: Any) -> ParamSplit:
    total = param_count(m)
    no_layers = param_count(dataclasses.replace(GPTConfig.from_section(m), n_layers=0))
    embedding = m.vocab_size * m.d_model + (m.seq_len * m.d_model if m.position == "learned" else 0)
    return ParamSplit(per_layer=(total - no_layers) // m.n_layers, embedding=embedding,
                      head=no_layers - embedding, total=total)


@shape_cached
def _stage_params(model: GPTConfig, tp: int, loads: tuple[tuple[int, bool], ...],
                  vocab: VocabUnderTP = TP_VOCAB["split"]) -> tuple[float, ...]:
    """Parameters each pipeline rank holds (its blocks as `loads` places them: stage_loads), before any
    data-parallel sharding.

    Megatron splits the block weights, column-parallel biases and the vocab-parallel embedding over
    TP ranks and replicates norms, row-parallel biases and learned positions (megatron/core/
    tensor_parallel/layers.py; vocabulary padding is ignored); software that splits only the blocks, or
    the output layer but not the embedding, keeps the rest whole (software.TP_VOCAB). The embeddings live
    on the first stage (rank 0), the final norm and output layer on the last; with PP > 1 a tied output
    projection is a second copy on the last stage (Narayanan et al. 2021, section 3).
    """
    layer = _block_params(model, tp)
    embedding = _rank_params(model, tp, ("tok_emb.", "pos_emb."), vocab.embedding_split)
    head = _rank_params(model, tp, ("norm_f.", "lm_head."), vocab.head_split)
    tied = len(loads) > 1 and model.tie_embeddings
    tied_copy = model.vocab_size * model.d_model / (tp if vocab.head_split else 1) if tied else 0
    return tuple(blocks * layer + (embedding if rank == 0 else 0) + (head + tied_copy if last else 0)
                 for rank, (blocks, last) in enumerate(loads))


def _rank_params(model: GPTConfig, tp: int, prefixes: tuple[str, ...], split: bool = True) -> float:
    """Parameters of the tensors named by `prefixes` on one TP rank (split over TP where the tensor is)."""
    return sum(t.numel / tp if t.tp_split and split else t.numel
               for t in param_tensors(model) if t.name.startswith(prefixes))


@shape_cached
def _block_params(model: GPTConfig, tp: int) -> float:
    return _rank_params(model, tp, ("blocks.0.",))


def layers_per_stage(job: Job) -> int:
    """Blocks on the pipeline rank that holds the most (stage_loads): the rank whose FSDP units, TP collectives
    and ring-attention passes set the step."""
    return most_blocks(job)[1][0]


def most_blocks(job: Job) -> tuple[int, tuple[int, bool]]:
    """The pipeline rank that holds the most blocks (the first such), and its (blocks, holds the output layer)."""
    loads = stage_loads(job)
    rank = max(range(len(loads)), key=lambda r: loads[r][0])
    return rank, loads[rank]


def stage_loads(job: Job) -> tuple[tuple[int, bool], ...]:
    """(blocks, holds the output layer) for each pipeline rank, as the software splits the blocks over its stages
    (software.PP_PARTITIONS): megatron's split, or DeepSpeed's balanced partition of the layers its regex
    matches, whose larger parts come first (partition_balanced since DeepSpeed's pull 4312, late 2023: 70 blocks on
    8 stages are 9, 9, 9, 9, 9, 9, 8, 8; before it a greedy fill gave 9 x 7 and 7, the same busiest stage while the
    head costs less than the difference; with the embedding and the tied head counted, BLOOM's 70 on 12 are 6 items
    each under both, the ends 5 blocks). Virtual stages sit on the ranks as the schedule places them
    (PipelineSchedule.placement: looped, rank r holds r, r + pp, ...; v, rank r holds r and 2pp - 1 - r); the rank
    with the last stage holds the output layer, rank 0 the embedding."""
    return _stage_loads(job.model.n_layers, job.layout.pp, job.vpp, job.software.pp_partition,
                        PP_SCHEDULES[job.pp_schedule].placement)


@functools.lru_cache(maxsize=4096)
def _stage_loads(n: int, pp: int, v: int, method: str, placement: str) -> tuple[tuple[int, bool], ...]:
    """Cached on what it depends on: the planner asks for it under thousands of layouts."""
    stages = pp * v
    split = pipeline_split(n, stages) if method == "megatron" else None
    if split is not None:
        blocks = [len(r) for r in split]
    else:
        ends = 1 if method == "type:transformer|embedding" else 0  # the embedding and the head count as items
        items = n + 2 * ends
        base, extra = divmod(items, stages)
        blocks = [base + (s < extra) for s in range(stages)]
        blocks[0], blocks[-1] = max(0, blocks[0] - ends), max(0, blocks[-1] - ends)
    if placement == "v" and v == 2:
        owned = [(r, stages - 1 - r) for r in range(pp)]
    else:
        owned = [tuple(range(r, stages, pp)) for r in range(pp)]
    return tuple((sum(blocks[s] for s in mine), stages - 1 in mine) for mine in owned)
