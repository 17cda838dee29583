"""Memory per device by category: weights, gradients, optimizer state, activations, buffers, overhead.

Model states follow Rajbhandari et al. 2020 (ZeRO, section 3 and figure 1): mixed-precision Adam
keeps 2 bytes of 16-bit weights, 2 of 16-bit gradients and K = 12 of fp32 master weights, momentum
and variance per parameter; stage 1 shards the optimizer state over the N data-parallel ranks,
stage 2 also the gradients, stage 3 also the weights: (2+2+K)Ψ, 4Ψ + KΨ/N, 2Ψ + (2+K)Ψ/N,
(2+2+K)Ψ/N. PyTorch DDP and FSDP2 (autocast / MixedPrecisionPolicy) keep fp32 weights and
gradients instead (4 + 4 + 8 bytes) and cast copies for compute; FSDP2 shards like stage 3
(full_shard), keeps gathered blocks between forward and backward (shard_grad_op), shards within a
node only (hybrid_shard) or not at all (no_shard); accumulating several micro-batches, it holds every
gradient unsharded in fp32 until the last one reduces them (layout.Job.unsharded_grad_bytes), unless the software
reduces every micro-batch's (Software.fsdp_defers_grad_sync).
DeepSpeed 3D keeps Ψ/(PP·TP) per rank with ZeRO-1 over DP (the issue's M_p/(PP·TP) + M_o/DP + M_g/(PP·TP)).

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", section 4): per layer s·b·h·(34 + 5·a·s/h) bytes in 16 bits with dropout, of which
10·s·b·h is replicated over TP ranks unless sequence parallelism splits it; full recompute keeps
only each layer's 2·s·b·h input; selective recompute (section 5) drops the core attention's 5·a·s²·b
(scores, softmax, dropout mask) and keeps the rest; the attention sub-layer variant keeps none of the
attention's activations; with 1F1B pipeline rank r holds min(micro-batches, PP − r) micro-batches, and the
other schedules what torch's pass order keeps (in_flight_micro_batches); GPipe and looped BFS hold all of
them. Each pipeline rank is priced with the blocks, embedding and output layer the software's split gives it
(layout.stage_loads), and the device's figure is the rank that needs the most.
With context parallelism a rank holds s/cp of each sequence, so every s·b·h term is 1/cp; the score matrix
is a/cp·s² (ulysses: whole sequences, a cp-th of the heads) or a·(s/cp)·s (ring: its queries against all keys).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

from harness.core.registry import PP_SCHEDULES
from harness.costmodel.layout import Job, stage_loads

GB = 1e9
REFUSE_ABOVE = 1.25
"""A layout is refused when its predicted memory exceeds the device's by more than this factor, and warned about
between 1 and this factor: what a rank really peaks at also depends on the caching allocator's fragmentation,
the kernels' workspaces and the loss implementation, which differ from run to run by more than the model's
accuracy (published FSDP2 runs measured 0.90–1.17× the prediction, before the caching allocator's reserve;
docs/costmodel.md)."""


def memory_verdict(need: float, have: Optional[float]) -> Optional[str]:
    """fits | tight (above the device, within REFUSE_ABOVE: may fit) | too big (refused); None: no device size."""
    if have is None or have <= 0:
        return None
    return "fits" if need <= have else "tight" if need <= REFUSE_ABOVE * have else "too big"


def model_state_bytes(params: float, job: Job) -> dict[str, float]:
    """Weights, gradients and optimizer state per device for `params` parameters on this rank."""
    per = job.state_bytes
    shards = job.shards
    if job.offload:
        return {"weights": 0.0, "grads": 0.0, "optimizer": 0.0}
    unsharded = job.unsharded_grad_bytes  # FSDP2 accumulating micro-batches: every gradient whole, until reduced
    return {
        "weights": params * per.weights / shards.weights,
        "grads": params * unsharded if unsharded is not None else params * per.grads / shards.grads,
        "optimizer": params * per.optimizer / shards.optimizer,
    }


def layer_activation_bytes(job: Job, checkpointing: str) -> float:
    """Bytes one transformer layer stores for its backward pass, per micro-batch, on one TP rank."""
    m, t, cp = job.model, job.layout.tp, job.layout.cp
    s, b, h = m.seq_len // cp, job.layout.micro_batch_size, m.d_model  # s: this rank's chunk of each sequence
    a, g, dh, f = m.n_heads, m.kv_heads, m.head_dim, m.ffn_width
    B, S, sbh = job.act_bytes, job.stream_bytes, s * b * h  # S: the residual stream's (fp32 under autocast)
    # the score matrix of a rank: ulysses holds heads/cp whole sequences, ring its s/cp queries against all keys
    scores = a * s * m.seq_len * b if job.cp_kind == "ring" else a / cp * m.seq_len * m.seq_len * b
    split_over_tp = t if job.sequence_parallel else 1
    if checkpointing == "full":
        return S * sbh / split_over_tp
    mask = 1 if job.software.dropout else 0
    replicated = 2 * S * sbh + 2 * B * sbh + 2 * mask * sbh  # two norm inputs, qkv and fc inputs, two dropout masks
    mlp = B * s * b * f * (2 if m.activation == "swiglu" else 1) + B * s * b * f  # activation input, proj input
    attn_core = (B + mask * (1 + B)) * scores if not job.software.fused_attention else 4 * a * s * b
    attention = B * s * b * (a + 2 * g) * dh + B * sbh + attn_core  # q, k, v; proj input; scores or logsumexp
    if checkpointing == "attention":  # the attention sub-layer is recomputed from its input
        attention = 0.0
    elif checkpointing == "selective":  # core attention is recomputed from q, k, v (Korthikanti et al. sec. 5)
        attention -= attn_core
    return replicated / split_over_tp + (attention + mlp) / t


@dataclass(frozen=True)
class PipelineRank:
    """One pipeline rank as the memory model prices it (the only rank when there is no pipeline)."""

    index: int
    blocks: int
    last: bool
    """Holds the output layer, so the loss too."""
    params: float
    """Its parameters before data-parallel sharding (layout.Job.stage_params)."""


def pipeline_ranks(job: Job) -> list[PipelineRank]:
    """The ranks that can need the most memory: for each kind of rank (its blocks, whether it holds the embedding or
    the output layer) the first, since a later rank of the same kind holds no more micro-batches in flight."""
    loads, params = stage_loads(job), job.stage_params
    return [PipelineRank(i, loads[i][0], loads[i][1], params[i]) for i in _first_of_each_kind(loads)]


@functools.lru_cache(maxsize=4096)
def _first_of_each_kind(loads: tuple[tuple[int, bool], ...]) -> tuple[int, ...]:
    """Cached on the split: the planner prices the same few splits under thousands of layouts."""
    kinds = {(blocks, last, index == 0): index for index, (blocks, last) in reversed(list(enumerate(loads)))}
    return tuple(sorted(kinds.values()))


def in_flight_micro_batches(job: Job, rank: int = 0) -> float:
    """Micro-batches whose activations pipeline rank `rank` holds at once, as torch's schedules order the passes
    (torch/distributed/pipelining/schedules.py, each schedule's _calculate_single_rank_operations): under 1F1B
    min(micro-batches, pp - rank), its warm-up forwards and the one in flight (DeepSpeed's TrainSchedule too);
    interleaved 1F1B with v stages per rank (v - 1)·r + 2·(pp - rank - 1) + 1 of its chunks, each 1/v of its blocks,
    r the micro-batches per round (micro-batches // max(1, micro-batches // pp)); the interleaved zero-bubble
    schedule (v - 1)·r + pp chunks on every rank, whose inputs wait for their deferred weight-gradient passes;
    ZB-V 2·min(micro-batches, pp) chunks, pp micro-batches as 1F1B's first rank (Qi et al. 2024); GPipe and looped
    breadth-first run every micro-batch's forward before the backwards, so they hold all of them. A later rank of
    a schedule never holds more than an earlier one (pipeline_ranks relies on it)."""
    pp, v, mb = job.layout.pp, job.vpp, job.micro_batches
    if pp == 1:
        return 1.0
    schedule = PP_SCHEDULES[job.pp_schedule]
    if schedule.holds_all_micro_batches:
        return float(mb)
    if schedule.placement == "v":
        return float(min(mb, pp))
    if v > 1:
        per_round = mb // max(1, mb // pp)
        warm_up = pp - 1 if schedule.split_backward else 2 * (pp - rank - 1)
        return min(mb * v, (v - 1) * per_round + warm_up + 1) / v
    return float(min(mb, pp - rank))


def activation_bytes(job: Job, rank: Optional[PipelineRank] = None) -> float:
    """What a pipeline rank stores for its backward (every micro-batch in flight, each of its layers' checkpoint
    or whole activations) and the layer being recomputed holds meanwhile (default: the rank that needs the most)."""
    return rank_memories(job, [rank or busiest_rank(job)])[0]["activations"]


def recompute_working_set(job: Job) -> float:
    """What the layer being recomputed holds meanwhile under full recompute: its whole activations."""
    return layer_activation_bytes(job, "none") if job.checkpoint_modes.get("full") else 0.0


def loss_bytes(job: Job) -> tuple[float, float]:
    """(the loss at its peak, in its backward; what of it the training loop still holds afterwards).

    PyTorch's cross entropy (log_softmax, then nll_loss) saves the log-softmax, and its backward holds it beside
    the gradient nll_loss hands it and the one log_softmax returns, three tensors of the logits' size in the loss's
    dtype (fp32, or the compute dtype where the software takes the loss on the 16-bit logits: KempnerForge), and
    the logits themselves where the training loop keeps them (Software.loop_holds_logits), which it does through
    the whole backward: 12 bytes per logit, 4E for KempnerForge. Megatron's vocab-parallel loss works in place on
    one fp32 copy, and a fused cross entropy writes the gradient in its forward: the logits and one more tensor
    (E + 8, or 2E on 16-bit logits); both are gone once the output layer's backward has run."""
    E, sw = job.act_bytes, job.software
    logits = job.tokens * job.vocab_per_rank[1]
    if sw.loss_kind != "eager":  # in place: one more tensor, beside an fp32 copy if upcast
        return logits * (E + (E if sw.loss_in_compute_dtype else 8.0)), 0.0
    held = E if sw.loop_holds_logits else 0.0
    return logits * (held + 3 * (E if sw.loss_in_compute_dtype else 4.0)), logits * held


def buffer_bytes(job: Job, rank: Optional[PipelineRank] = None) -> float:
    """Temporary tensors that are not model state or stored activations, on a pipeline rank (default: the rank that
    needs the most): _buffers."""
    return rank_memories(job, [rank or busiest_rank(job)])[0]["buffers"]


def _buffers(job: Job, rank: PipelineRank, loss: tuple[float, float], working_set: float) -> float:
    """Temporary tensors that are not model state or stored activations, on one pipeline rank.

    The loss at its peak (loss_bytes), which runs before any layer is recomputed: the two never coexist (unless a
    pipeline schedule holds every micro-batch's forward, GPipe's), so beside the recompute working set (counted
    with the activations) the buffers count only what the loss holds beyond it, or what the loop still holds of
    it then, whichever is larger;
    FSDP and ZeRO-3 gather blocks in the compute dtype (current + one prefetched) and produce one
    unsharded block gradient in the reduce dtype (Job.reduce_bytes: fp32 unless FSDP's reduce_dtype says) before
    reducing it; shard_grad_op keeps every gathered block
    until its backward; PyTorch DDP reduces in gradient buckets that copy the gradients
    (`gradient_as_bucket_view=False`, its default); DeepSpeed ZeRO-1/2 in one preallocated bucket; under
    autocast the 16-bit weight copies the linears save for their backward (autocast_weight_copies).
    """
    layout = job.layout
    peak, held = loss if rank.last else (0.0, 0.0)
    # GPipe and looped BFS run every micro-batch's forward first: the other micro-batches' losses are still held
    # when the first layer is recomputed, so the loss and the working set are not kept apart there
    apart = layout.pp == 1 or not PP_SCHEDULES[job.pp_schedule].holds_all_micro_batches
    gathered = gathered_bytes(job, rank)
    if apart:  # the loss peaks before the blocks' backward, FSDP holding then what gathered_at_loss says
        logits_and_units = max(peak + gathered_at_loss(job, rank) - working_set, held + gathered)
    else:
        logits_and_units = peak + gathered
    buckets = 0.0
    if job.ddp_buckets:
        buckets = rank.params * job.state_bytes.grads
    if job.spec.deepspeed_engine and not job.software.own_optimizer and layout.zero_stage >= 1 \
            and job.ds_reduce_bucket:
        # ZeRO-1/2 copy gradients into a contiguous bucket of reduce_bucket_size elements in the model's dtype,
        # allocated whole however small the model, a second one with overlap_comm (DeepSpeedZeroOptimizer.
        # setup_buckets): 1 GB in 16 bits at DeepSpeed's default, 2 GB in fp32; ZeRO-3 allocates one such bucket
        # per gradient dtype when it initialises (stage3.py, the IPG buckets' buffer, with contiguous_gradients)
        copies = 2 if job.ds_overlap_comm and layout.zero_stage < 3 else 1  # overlap_comm: off by default below 3
        buckets += copies * job.ds_reduce_bucket * job.state_bytes.weights
    return logits_and_units + buckets + autocast_weight_copies(job, rank)


def _gathers_units(job: Job) -> bool:
    """FSDP, ZeRO-3 or offload gathers parameters from shards, so the rank holds unsharded copies at times."""
    return job.fsdp_wraps or job.shards.weights > 1 or job.offload


def _root_params(job: Job, rank: PipelineRank) -> float:
    """This pipeline rank's parameters outside its blocks (FSDP's root: embedding, final norm, output layer)."""
    return max(0.0, rank.params - rank.blocks * job.block_params_per_rank)


def _head_params(job: Job, rank: PipelineRank) -> float:
    """The output layer's parameters on this rank, as its TP rank holds them (none off the last stage)."""
    return job.vocab_per_rank[0] * job.model.d_model if rank.last else 0.0


def gathered_bytes(job: Job, rank: Optional[PipelineRank] = None) -> float:
    """What FSDP and ZeRO-3 hold unsharded beside the shards in a block's backward: the gathered blocks in the
    compute dtype (current + one prefetched, and the root module, gathered again for the backward; every unit where
    FSDP keeps them gathered: Job.keeps_units_gathered), the previous block's gradient in the reduce dtype (the
    reduce-scatter input FSDP keeps until the next unit's reduction), and under FSDP2 without pipeline stages (whose
    accumulated gradients the model states hold) the current block's unsharded gradient in the parameters' dtype
    (where units stay gathered, in place of that block's parameters, freed before its reduction) and, on the rank
    with the output layer, that layer's gradient, held from the loss's backward until the root's
    reduction (a tied embedding's until the embedding's backward adds its own). FSDP2 runs its gather and reduce on
    one-rank groups too (no_shard's, a TP-only mesh's): it copies each unit's parameters into unsharded buffers and
    its gradients into a reduce-scatter input all the same (torch 2.13 FSDPParamGroup.wait_for_unshard and
    foreach_reduce at world_size 1)."""
    if not _gathers_units(job):
        return 0.0
    rank = rank or busiest_rank(job)
    E, block = job.act_bytes, job.block_params_per_rank  # as this TP rank holds them
    held = rank.params if job.keeps_units_gathered else 2 * block + _root_params(job, rank)
    grads = 0.0
    if job.fsdp_wraps and job.layout.pp == 1:
        head = _head_params(job, rank)
        # where every unit stays gathered, the first block's backward is the phase's peak, and that block's
        # parameters are freed before its reduce-scatter input is allocated: its gradient takes their place
        grads = (head if job.keeps_units_gathered else block + head) * E
    return held * E + block * job.reduce_bytes + grads


def gathered_at_loss(job: Job, rank: PipelineRank) -> float:
    """What FSDP and ZeRO-3 hold unsharded when the loss peaks, after the last forward: every unit where units stay
    gathered (Job.keeps_units_gathered); where they reshard after the forward (the root too: the harness and
    KempnerForge pass reshard_after_forward to it) the root and the last block, which the root's pre-backward hook
    gathers and prefetches as soon as the backward reaches the root's output, before the loss's own backward runs
    where the model returns the loss (the harness's models/gpt.py: profiled on CPU, FSDP::pre_backward inside
    NllLossBackward0), and nothing where the loop takes the logits and computes the loss outside the model
    (Software.loop_holds_logits, KempnerForge: the hook waits for the logits' gradient). gathered_bytes counts what
    a block's backward holds."""
    if not _gathers_units(job):
        return 0.0
    if job.keeps_units_gathered:
        return rank.params * job.act_bytes
    if not (job.fsdp_wraps and rank.last) or job.software.loop_holds_logits:  # the hook is FSDP2's
        return 0.0
    return (_root_params(job, rank) + job.block_params_per_rank) * job.act_bytes


def end_of_backward_bytes(job: Job, rank: PipelineRank, held_logits: float) -> float:
    """What FSDP holds beyond the shards at the end of the backward, when every activation is gone, in the larger
    of its two last phases (torch 2.13, _fully_shard/_fsdp_param_group.py; a profiled FSDP2 run on this CPU peaks
    in the first, benchmarks/memory_cpu.py):

    - the embedding's backward: the root gathered again for the backward, block 0's reduce-scatter input still
      held (FSDP frees it at the next unit's reduction), the output layer's gradient held since the backward began,
      and the embedding's dense gradient (a vocabulary × hidden tensor in the parameters' dtype); a tied embedding
      sums its output-layer gradient and its own into a third such tensor (autograd's accumulation of the two
      uses). torch's pipeline stages keep every unit gathered (set_reshard_after_backward(False)) and reduce
      nothing until the step's end (their accumulated gradients are in the model states);
    - the root's reduction: its parameters resharded first (post_backward reshards before foreach_reduce), its
      unsharded gradients beside the copy it reduce-scatters in the reduce dtype; in a pipeline stage the other
      units still gathered, and the root's gradients already in the model states.

    Both beside the logits the training loop still holds."""
    if not job.fsdp_wraps:
        return 0.0
    E, block, root = job.act_bytes, job.block_params_per_rank, _root_params(job, rank)
    embedding = job.embedding_rows * job.model.d_model if rank.index == 0 else 0.0
    if job.model.tie_embeddings and job.layout.pp == 1:  # one parameter: its two gradients and their sum
        grads = 3 * embedding
    else:
        grads = embedding + _head_params(job, rank)
    if job.layout.pp > 1:  # torch's stages: every unit gathered, nothing reduced before the step's end
        embedding_phase = rank.params * E + grads * E
        reduce_phase = (rank.params - root) * E + root * job.reduce_bytes
    else:
        embedding_phase = root * E + grads * E + block * job.reduce_bytes
        reduce_phase = root * (E + job.reduce_bytes)
    return max(embedding_phase, reduce_phase) + held_logits


def whole_graph_gradients(job: Job, rank: PipelineRank) -> float:
    """Gradients a whole-model torch.compile returns at once: with no FSDP hooks to break it (KempnerForge on one
    GPU: torch.compile(model), Software.compile_whole_model), the backward is one AOTAutograd graph whose outputs are
    every parameter's gradient, all live when it ends, before autograd adds each into the .grad the earlier
    micro-batches left (the first micro-batch's are taken as .grad itself): a second copy of the gradients in their
    dtype at the backward's end, when accumulating."""
    sw = job.software
    if sw.compiled and sw.compile_whole_model and not job.fsdp_wraps and job.micro_batches > 1:
        return rank.params * job.state_bytes.grads
    return 0.0


def autocast_weight_copies(job: Job, rank: Optional[PipelineRank] = None) -> float:
    """Under autocast each linear computes with a 16-bit copy of its fp32 weight and saves that copy for its
    backward, so a rank holds one for every linear whose forward was not checkpointed (a fully recomputed block
    saves none) and the output layer's (the embedding is not cast: embedding is not on autocast's lists). The
    copies cached during a checkpointed forward are freed when autocast's region ends, before the backward."""
    if not job.autocast:
        return 0.0
    rank = rank or busiest_rank(job)
    saved = 1.0 - job.checkpoint_modes.get("full", 0.0)
    return (rank.blocks * job.block_params_per_rank * saved + _head_params(job, rank)) * job.act_bytes


def memory_per_device(job: Job, framework_overhead_bytes: float = 0.0) -> dict[str, float]:
    """Bytes per device of the pipeline rank that needs the most, by category, and their total."""
    return max(rank_memories(job, framework_overhead_bytes=framework_overhead_bytes), key=lambda m: m["total"])


def busiest_rank(job: Job) -> PipelineRank:
    """The pipeline rank that needs the most memory (pipeline_ranks)."""
    ranks = pipeline_ranks(job)
    if len(ranks) == 1:
        return ranks[0]
    totals = [m["total"] for m in rank_memories(job, ranks)]
    return ranks[totals.index(max(totals))]


def rank_memories(job: Job, ranks: Optional[list[PipelineRank]] = None,
                  framework_overhead_bytes: float = 0.0) -> list[dict[str, float]]:
    """Bytes per device of each pipeline rank (default: pipeline_ranks) by category, and their total; what does not
    depend on the rank (a layer's stored activations, the recompute's working set, the loss) computed once."""
    modes = job.checkpoint_modes
    per_layer = sum(share * layer_activation_bytes(job, mode) for mode, share in modes.items())
    working_set = recompute_working_set(job)
    loss = loss_bytes(job)
    out = []
    for rank in ranks or pipeline_ranks(job):
        memory = model_state_bytes(rank.params, job)
        memory["activations"] = rank.blocks * per_layer * in_flight_micro_batches(job, rank.index) + working_set
        memory["buffers"] = _buffers(job, rank, loss, working_set)
        # at the backward's end the activations are gone; where a second set of gradients, or FSDP's last phases,
        # hold more then, the step peaks there, counted with the buffers
        end = max(whole_graph_gradients(job, rank), end_of_backward_bytes(job, rank, loss[1] if rank.last else 0.0))
        memory["buffers"] = max(memory["buffers"], end - memory["activations"])
        memory["overhead"] = framework_overhead_bytes
        memory["total"] = sum(memory.values())
        out.append(memory)
    return out
