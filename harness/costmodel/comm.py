"""Communication per device per optimizer step, by collective and parallel dimension, and the links it crosses.

Volumes use the ring (bandwidth-optimal) algorithms: over p ranks an all-reduce of S bytes sends
2(p−1)/p·S per rank, an all-gather or reduce-scatter whose full tensor is S sends (p−1)/p·S
(Thakur, Rabenseifner & Gropp 2005; Patarasuk & Yuan 2009). So DDP moves 2Ψ·bytes per step,
ZeRO-1/2 the same (reduce-scatter + all-gather; DeepSpeed 0.19 all-reduces each gradient bucket whole by
default, 3Ψ), ZeRO-3 and FSDP 3Ψ·bytes (Rajbhandari et al. 2020, section 7); DeepSpeed's ZeRO-3 gathers
less where it keeps parameters (`zero3_gathered_numel`).
Tensor parallelism all-reduces the b·s·h activations twice per layer in the forward and twice in
the backward, once more per recomputed sub-layer (Narayanan et al. 2021, section 2.3;
Korthikanti et al. 2022: sequence parallelism turns each all-reduce into an all-gather and a
reduce-scatter of the same volume). Pipeline stages send b·s·h activations forward and their
gradients backward once per micro-batch and virtual stage (each rank receives as much as it sends);
1/TP of it where the software keeps a boundary split over TP ranks (sequence parallelism) or scatters
it and gathers it again on the next stage (software.py).

`payload_bytes × calls` is what the torch profiler records on a real gloo run (tests/
test_comm_volume.py), including collectives DeepSpeed issues over a one-rank group: those have
`group=1` and move no bytes (`wire_bytes` 0).

Rank order is Megatron's and DeepSpeed's (TP fastest, then CP, then DP, then PP): a group of ranks `stride` apart
has `devices_per_node / stride` of its members in each node (all of them if they fit, one if the stride is a
node or more); what a call costs over that placement is network.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from harness.core.registry import CHECKPOINTING, PP_SCHEDULES
from harness.costmodel.flops import param_modules, param_tensors, shape_cached
from harness.costmodel.layout import Job, Zero3, layers_per_stage, stage_loads
from harness.costmodel.network import RING_FACTOR
from harness.models.config import GPTConfig


@dataclass(frozen=True)
class Collective:
    dim: str
    """dp | tp | pp | cp."""
    kind: str
    """all_reduce | all_gather | reduce_scatter | send_recv | all_to_all."""
    payload_bytes: float
    """The full tensor of one call (the gathered or reduced size), as a profiler records it."""
    calls: float
    """Calls per optimizer step."""
    group: int
    """Ranks in the group."""
    local: int
    """Ranks of the group in one node (the group spans ceil(group / local) nodes, the last maybe in part)."""
    units: int = 1
    """Collectives each call is issued as, the payload split evenly over them, each paying the library's latency:
    FSDP2 gathers and reduces one `fully_shard` unit at a time (every block, then the root's own parameters), so a
    pass over the model is that many ring collectives, whose latency grows with the ranks (network.py)."""
    stride: int = 1
    """Rank distance between the group's members inside a node: it holds the node's devices 0, stride, 2·stride, ...
    (a data-parallel group beside TP: tp apart), whose links its rings use (network.Fabric.intra_ring)."""

    @property
    def intra_node(self) -> bool:
        return self.local >= self.group

    @property
    def role(self) -> str:
        """What it carries, which decides what it can overlap with (timing.py): grads | params | activations | p2p."""
        if self.dim == "dp":
            return "params" if self.kind == "all_gather" else "grads"
        if self.dim == "pp":
            return "grads" if self.kind == "all_reduce" else "p2p"
        return "activations"

    @property
    def wire_bytes(self) -> float:
        """Bytes this device sends per step (what it receives is the same)."""
        return RING_FACTOR[self.kind](self.group) * self.payload_bytes * self.calls


def per_node(stride: int, size: int, job: Job) -> int:
    """Members per node of a group of `size` ranks `stride` apart (ranks fill nodes in order): all of them if the
    group fits a node, a node's share if it spans whole nodes; where groups straddle node boundaries unevenly (TP 4
    on Summit's 6 GPUs per node: ranks 4-7 sit 2 and 2 in two nodes), the fewest any group has in one node, the
    greatest common divisor of the two, which paces that group's collectives."""
    if stride >= job.devices_per_node:
        return 1
    node = job.devices_per_node // stride
    if node % size == 0 or size % node == 0:
        return max(1, min(size, node))
    return math.gcd(size, node)


def dp_collectives(job: Job) -> list[Collective]:
    """Gradient reduction and parameter gathering over the data-parallel group, per backend and stage."""
    layout = job.layout
    dp, m = job.grad_ranks, job.micro_batches  # context-parallel ranks hold the same parameters: they reduce too
    params = job.params_per_rank
    per = job.state_bytes
    local = per_node(layout.tp, dp, job)

    def c(kind: str, payload: float, calls: float, group: int = dp, members: int = local, units: int = 1,
          stride: int = layout.tp) -> Collective:
        return Collective("dp", kind, payload, calls, group, members, units, stride)

    stage = layout.zero_stage
    if dp == 1:
        # ZeRO-1's gradient reduction (deepspeed/runtime/zero/stage_1_and_2.py `reduce_gradients`)
        # still runs over a one-rank group; only the parameter all-gather checks for it
        # (deepspeed/runtime/utils.py `all_gather_dp_groups`).
        zero1 = job.spec.deepspeed_engine and stage == 1
        return [c("reduce_scatter", params * per.grads, 1)] if zero1 else []
    if job.spec.shardings:
        return _fsdp_collectives(job, params, c)
    buckets = grad_bucket_count(job)
    if stage == 0:
        return [c("all_reduce", params * per.grads, 1, units=buckets)]
    # DeepSpeed 0.19 all-reduces each gradient bucket whole (Software.zero_bucket_allreduce)
    whole = (job.software.zero_bucket_allreduce and job.ds_bucket_allreduce) or job.software.zero_reduce_after_backward
    reduce = "all_reduce" if whole else "reduce_scatter"
    if stage == 1:
        return [c(reduce, params * per.grads, 1, units=buckets),
                c("all_gather", params * per.weights, 1, units=buckets)]
    if stage == 2:  # DeepSpeed reduces partitioned gradients in every micro-batch's backward
        return [c(reduce, params * per.grads, m), c("all_gather", params * per.weights, 1)]
    per_micro_batch, per_step = zero3_gathered_numel(job)
    gathers = [c("all_gather", per_micro_batch * per.weights, m)]
    if per_step:
        gathers.append(c("all_gather", per_step * per.weights, 1))
    return gathers + [c("reduce_scatter", params * per.grads, m)]


MEGATRON_BUCKET_PARAMS = (40_000_000, 1_000_000)
"""megatron-core's default bucket: max(40M, 1M × data-parallel ranks) parameters (Software.grad_bucket_params; its
parallel_state.get_data_parallel_world_size(), the context-parallel ranks not counted)."""


def grad_bucket_count(job: Job) -> int:
    """Collectives per gradient reduction (and distributed-optimizer gather) of software that reduces bucket by
    bucket (Software.grad_buckets) while it overlaps the backward: about one per grad_bucket_params over the first
    pipeline stage's first model chunk (its first virtual stage's blocks and the embedding; megatron closes a bucket
    once it holds at least that many, so a large tensor can leave fewer) and one per other chunk (later stages keep
    one per chunk, but the first stage finishes its backward last, so its reduction is the one the step waits for).
    1 otherwise."""
    sw = job.software
    if not sw.grad_buckets or not job.grad_reduce_overlap:
        return 1
    size = sw.grad_bucket_params or max(MEGATRON_BUCKET_PARAMS[0], MEGATRON_BUCKET_PARAMS[1] * job.layout.dp)
    blocks, block = stage_loads(job)[0][0], job.block_params_per_rank
    first_chunk = job.stage_params[0] - blocks * block + blocks / job.vpp * block
    return max(1, math.ceil(first_chunk / size)) + job.vpp - 1


def zero3_gathered_numel(job: Job) -> tuple[float, float]:
    """Parameters ZeRO-3 all-gathers (full numel): per micro-batch, and once per step.

    deepspeed/runtime/zero/parameter_offload.py `mark_persistent_parameters`: tensors of at most
    `stage3_param_persistence_threshold` elements (while their sum stays within
    `stage3_model_persistence_threshold`) stay gathered, and are all-gathered again once per step
    after the optimizer updated their shards (stage3.py `_post_step`). Every other tensor is
    gathered where the forward first uses it; partitioned_param_coordinator.py
    `__params_to_release` frees it after a use only if the parameters of the modules before its
    next use in the forward + backward trace reach `stage3_max_reuse_distance` elements (a freed
    tensor is gathered again at that use). Reuse inside the prefetch window also keeps it, taken
    here as the same rule with `stage3_prefetch_bucket_size`. With the defaults every tensor of a
    block whose later layers hold fewer than ~5e8 parameters is gathered once per micro-batch, not
    twice as in the ZeRO paper's 3Ψ.
    """
    return _zero3_gathered_numel(job.model, job.zero3)


@shape_cached
def _zero3_gathered_numel(model: GPTConfig, z: Zero3) -> tuple[float, float]:
    persistent: set[str] = set()
    kept = 0
    for t in param_tensors(model):
        if t.numel <= z.param_persistence_threshold and kept + t.numel <= z.model_persistence_threshold:
            persistent.add(t.name)
            kept += t.numel
    forward = param_modules(model)
    trace = forward + forward[::-1]
    before = [0]  # parameters of trace[:i]
    uses: dict[str, list[int]] = {}
    for i, (_, tensors) in enumerate(trace):
        before.append(before[-1] + sum(t.numel for t in tensors))
        for t in tensors:
            uses.setdefault(t.name, []).append(i)
    numel = {t.name: t.numel for t in param_tensors(model)}
    reuse = max(z.max_reuse_distance, z.prefetch_bucket_size)
    per_micro_batch = 0
    for name, steps in uses.items():
        if name not in persistent:
            regathers = sum(before[b] - before[a + 1] >= reuse for a, b in zip(steps, steps[1:]))
            per_micro_batch += numel[name] * (1 + regathers)
    return float(per_micro_batch), float(kept)


def _fsdp_collectives(job: Job, params: float, c) -> list[Collective]:  # type: ignore[no-untyped-def]
    """FSDP2: parameters gathered in the compute dtype, gradients reduced in backend.reduce_dtype (fp32 by default),
    once per step or once per micro-batch (Job.fsdp_reduces_every_micro_batch), each pass one collective per
    `fully_shard` unit (`Collective.units`).

    Fabric's `no_backward_sync` skips the reduce-scatter of all but the last micro-batch; software that does not
    defer it (Software.fsdp_defers_grad_sync) reduce-scatters in every micro-batch's backward. With
    full_shard every parameter, the root module's too, is gathered again for the backward: that is
    what torch 2.13's profiler records (tests/test_comm_volume.py), although FSDP2's documentation
    describes keeping the root unsharded after forward.
    """
    dp, R = job.grad_ranks, job.reduce_bytes
    units = job.fsdp_units
    reductions = job.micro_batches if job.fsdp_reduces_every_micro_batch else 1
    if job.sharding == "no_shard":  # FSDP2 on a replicate x 1 mesh: an all-reduce per unit
        return [c("all_reduce", params * R, reductions, units=units)]
    n, tp = job.shards.weights, job.layout.tp
    local = per_node(tp, n, job)
    out = [c("all_gather", params * job.act_bytes, job.fsdp_gathers, n, local, units)]
    out.append(c("reduce_scatter", params * R, reductions, n, local, units))
    if job.sharding == "hybrid_shard" and dp > n:
        out.append(c("all_reduce", params * R / n, reductions, dp // n, per_node(tp * n, dp // n, job), units,
                     tp * n))
    return out


def tp_collectives(job: Job) -> list[Collective]:
    """Megatron's TP all-reduces of b·s·h activations, two per layer in the forward and two in the backward, and
    the vocabulary's collectives (software.VocabUnderTP): a vocab-parallel loss's three all-reduces of b·s fp32
    (max, target logit, sum of exponentials: megatron/core/tensor_parallel/cross_entropy.py), the gathered
    logits' all-gather of b·s·V, the head input's gradient all-reduce, and those where the residual stream enters
    and leaves the TP blocks.

    Software that gathers the input of every column-parallel projection on its own (Software.
    tp_gather_per_projection: q, k, v and gate, up) runs that many all-gathers in each forward, recompute too,
    and as many reduce-scatters in the backward (without sequence parallelism: all-reduces in the backward).
    Software that keeps a column-parallel linear's sequence-split input and gathers it again for the weight
    gradient (Software.tp_regather_input) runs one more all-gather per sub-layer in each backward, and one for a
    column-parallel output layer."""
    layout, m = job.layout, job.model
    t = layout.tp
    if t == 1:
        return []
    tokens = job.tokens
    payload = tokens * m.d_model * job.act_bytes
    recompute = CHECKPOINTING[job.checkpointing].tp_collectives
    per_layer = 4 + recompute  # 2 forward + 2 backward, + recompute
    # extra input gathers per forward: q, k, v instead of one for attention, gate and up instead of one for the MLP
    extra = (2 + (m.activation == "swiglu")) if job.software.tp_gather_per_projection else 0
    layers, mb = layers_per_stage(job), job.micro_batches
    vocab = job.vocab
    gathers, scatters, reduces = vocab.boundary
    regathers = tp_regathers(job)
    head_regather = 1 if regathers and vocab.head_split else 0  # the column-parallel output layer's input
    forward = (per_layer + extra * (1 + recompute / 2) + regathers) * layers + gathers + head_regather
    backward = (per_layer + extra) * layers + (scatters if job.sequence_parallel else reduces)
    local = per_node(1, t, job)
    out = []
    if vocab.loss_split:
        out.append(Collective("tp", "all_reduce", tokens * 4, 3 * mb, t, local))
    if vocab.logits_gathered:
        out.append(Collective("tp", "all_gather", tokens * m.vocab_size * job.act_bytes, mb, t, local))
    if vocab.head_input_reduced:
        out.append(Collective("tp", "all_reduce", payload, mb, t, local))
    if job.sequence_parallel:
        return [Collective("tp", "all_gather", payload, forward * mb, t, local),
                Collective("tp", "reduce_scatter", payload, backward * mb, t, local), *out]
    return [Collective("tp", "all_reduce", payload, backward * mb, t, local), *out]


def tp_regathers(job: Job) -> int:
    """All-gathers per block and backward that bring a column-parallel linear's sequence-split input back for its
    weight gradient (Software.tp_regather_input): one per sub-layer (attention's q/k/v, the MLP's first linear)."""
    sw = job.software
    return 2 if job.layout.tp > 1 and job.sequence_parallel and sw.tp_regather_input \
        and not sw.tp_gather_per_projection else 0


def pp_collectives(job: Job) -> list[Collective]:
    """Stage-boundary sends, and the tied embedding's gradient all-reduce between the first and last
    stage once per step (deepspeed/runtime/pipe/engine.py `_exec_reduce_tied_grads`)."""
    layout = job.layout
    if layout.pp == 1:
        return []
    payload = job.tokens * job.model.d_model * job.act_bytes
    # Sends of the busiest rank: a middle stage sends each micro-batch's activations forward and its
    # gradients backward; an end stage only one of them, per model chunk it holds at an end.
    m, v = job.micro_batches, job.vpp
    calls = 2 * m * v if layout.pp > 2 else m * (2 * v - 1)
    stage = layout.tp * layout.dp * layout.cp  # ranks of one stage: the next stage's rank is this far away
    # 2: every boundary inside a node. Stages fill nodes in order, so once the pipeline spans nodes some boundary
    # crosses one, and every micro-batch passes through it: the slowest boundary paces the pipeline.
    neighbour = 2 if stage * layout.pp <= job.devices_per_node else 1
    split = job.sequence_parallel and job.software.pp_sends_sequence_split
    if layout.tp > 1 and (split or job.software.pp_scatter_gather):
        out = [Collective("pp", "send_recv", payload / layout.tp, calls, 2, neighbour, stride=stage)]
        if not split:  # scatter/gather: the receiving stage rebuilds the whole boundary over the node's links
            out.append(Collective("pp", "all_gather", payload, calls, layout.tp, per_node(1, layout.tp, job)))
    else:
        out = [Collective("pp", "send_recv", payload, calls, 2, neighbour, stride=stage)]
    if job.model.tie_embeddings and PP_SCHEDULES[job.pp_schedule].placement != "v":  # v: one rank holds both ends
        grads = job.state_bytes.grads
        # FSDP's pipeline all-reduces each pair's shard of the weight (harness/backends/pipeline.py
        # sum_tied_gradients): 65,536 bytes of gpt-tiny's 131,072 on 4 CPU ranks at pp 2 × dp 2
        tied = job.embedding_rows * job.model.d_model * grads / (job.shards.grads if job.spec.shardings else 1)
        ends = 2 if layout.world_size <= job.devices_per_node else 1  # the first and last stage, a node apart
        out.append(Collective("pp", "all_reduce", tied, 1, 2, ends, stride=stage * (layout.pp - 1)))
    return out


def cp_collectives(job: Job) -> list[Collective]:
    """Context parallelism's traffic per layer and micro-batch, over the cp ranks that share each sequence (tp
    apart, so a node holds devices_per_node / tp of them).

    - ulysses (Jacobs et al. 2023, section 3.1): an all-to-all of each of q, k and v before attention and one of
      its output after, each of this rank's (b·s/cp) × heads/tp × head_dim tensor, k and v with the KV heads;
      the backward runs the same four in reverse, and a recompute runs them again, but for the output's where
      only core attention is recomputed and the checkpoint stops early (Software.recompute_early_stop).
      On the critical path: they sit between the projections and the attention that needs their result.
    - ring (Liu et al. 2023) as torch 2.13 runs it (torch/distributed/tensor/experimental/_context_parallel/
      _attention.py: _AllGatherRotater, the default; the gradients' _AllToAllRotater): this rank's K and V
      all-gathered over the group once in each forward, backward and recompute, and the K and V gradients passed
      to the next rank cp times in fp32. The gathers overlap the first (diagonal) block's attention, the
      gradients' shifts each next block's backward, the last one nothing (timing.exposed_cp_s).
    """
    layout, m = job.layout, job.model
    cp = layout.cp
    if cp == 1:
        return []
    E, tp = job.act_bytes, layout.tp
    local = per_node(tp, cp, job)
    recompute = sum(share for mode, share in job.checkpoint_modes.items() if CHECKPOINTING[mode].region)
    passes = layers_per_stage(job) * job.micro_batches
    kv = job.tokens * 2 * m.kv_heads * m.head_dim / tp * E
    if job.cp_kind == "ring":
        # torch 2.13's ring (context_parallel's default rotate method, ALL_GATHER): one all-gather of this rank's
        # K and V over the group in each forward, backward and recompute; the K/V gradients rotate cp times as
        # fp32 point-to-point shifts (convert_to_f32)
        gathers = (2 + recompute) * passes
        grads = Collective("cp", "send_recv", kv / E * 4, cp * passes, 2, 2 if local >= cp else 1, stride=tp)
        return [Collective("cp", "all_gather", kv * cp, gathers, cp, local, stride=tp), grads]
    q_or_out = job.tokens * m.n_heads * m.head_dim / tp * E
    calls = (2 + recompute) * passes  # forward, backward and any recompute: each for q and out, and for k and v
    # recomputing only core attention stops at the attention's output, before its all-to-all, where PyTorch's
    # checkpoint stops early (all it saved is recomputed: measured with gloo, 4 all-to-alls forward, 7 backward)
    core = sum(share for mode, share in job.checkpoint_modes.items() if CHECKPOINTING[mode].region == "attn.core")
    unrun = core * passes if job.software.recompute_early_stop else 0.0
    return [Collective("cp", "all_to_all", q_or_out, 2 * calls - unrun, cp, local, stride=tp),
            Collective("cp", "all_to_all", kv / 2, 2 * calls, cp, local, stride=tp)]


def collectives(job: Job) -> list[Collective]:
    return dp_collectives(job) + tp_collectives(job) + pp_collectives(job) + cp_collectives(job)


DIMS = ("dp", "tp", "pp", "cp")
"""The parallel dimensions communication is counted by."""


def bytes_by_dim(colls: list[Collective]) -> dict[str, float]:
    out = {dim: sum(c.wire_bytes for c in colls if c.dim == dim) for dim in DIMS}
    out["total"] = sum(out.values())
    return out
