"""Memory per device by category: weights, gradients, optimizer state, activations, buffers, overhead.

Model states follow Rajbhandari et al. 2020 (ZeRO, section 3 and figure 1): mixed-precision Adam
keeps 2 bytes of 16-bit weights, 2 of 16-bit gradients and K = 12 of fp32 master weights, momentum
and variance per parameter; stage 1 shards the optimizer state over the N data-parallel ranks,
stage 2 also the gradients, stage 3 also the weights: (2+2+K)Ψ, 4Ψ + KΨ/N, 2Ψ + (2+K)Ψ/N,
(2+2+K)Ψ/N. PyTorch DDP and FSDP2 (autocast / MixedPrecisionPolicy) keep fp32 weights and
gradients instead (4 + 4 + 8 bytes) and cast copies for compute; FSDP2 shards like stage 3
(full_shard), keeps gathered blocks between forward and backward (shard_grad_op), shards within a
node only (hybrid_shard) or not at all (no_shard); accumulating several micro-batches, it holds every
gradient unsharded in fp32 until the last one reduces them (layout.Job.unsharded_grad_bytes).
DeepSpeed 3D keeps Ψ/(PP·TP) per rank with ZeRO-1 over DP (the issue's M_p/(PP·TP) + M_o/DP + M_g/(PP·TP)).

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", section 4): per layer s·b·h·(34 + 5·a·s/h) bytes in 16 bits with dropout, of which
10·s·b·h is replicated over TP ranks unless sequence parallelism splits it; full recompute keeps
only each layer's 2·s·b·h input; selective recompute (section 5) drops the core attention's 5·a·s²·b
(scores, softmax, dropout mask) and keeps the rest; the attention sub-layer variant keeps none of the
attention's activations; with 1F1B the first pipeline stage holds min(micro-batches, PP)
micro-batches, times (1 + (PP−1)/(PP·v)) with v interleaved stages; GPipe and looped BFS hold all of them.
With context parallelism a rank holds s/cp of each sequence, so every s·b·h term is 1/cp; the score matrix
is a/cp·s² (ulysses: whole sequences, a cp-th of the heads) or a·(s/cp)·s (ring: its queries against all keys).
"""

from __future__ import annotations

from typing import Optional

from harness.core.registry import PP_SCHEDULES
from harness.costmodel.layout import Job, layers_per_stage

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


def in_flight_micro_batches(job: Job) -> float:
    """Micro-batches whose activations the first pipeline stage holds at once: under 1F1B (and the zero-bubble
    schedules, whose peak Qi et al. keep at 1F1B's) at most pp; GPipe and looped breadth-first run every
    micro-batch's forward before the backwards, so they hold all of them."""
    pp = job.layout.pp
    if pp == 1:
        return 1.0
    if PP_SCHEDULES[job.pp_schedule].holds_all_micro_batches:
        return float(job.micro_batches)
    held = min(job.micro_batches, pp)
    return held * (1 + (pp - 1) / (pp * job.vpp)) if job.vpp > 1 else held


def activation_bytes(job: Job) -> float:
    """What the busiest stage stores for its backward (every micro-batch in flight, each layer's checkpoint or
    whole activations) and the layer being recomputed holds meanwhile."""
    layers = layers_per_stage(job)
    modes = job.checkpoint_modes
    per_layer = sum(share * layer_activation_bytes(job, mode) for mode, share in modes.items())
    return layers * per_layer * in_flight_micro_batches(job) + recompute_working_set(job)


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


def buffer_bytes(job: Job) -> float:
    """Temporary tensors that are not model state or stored activations.

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
    E = job.act_bytes
    peak, held = loss_bytes(job)
    # GPipe and looped BFS run every micro-batch's forward first: the other micro-batches' losses are still held
    # when the first layer is recomputed, so the loss and the working set are not kept apart there
    apart = layout.pp == 1 or not PP_SCHEDULES[job.pp_schedule].holds_all_micro_batches
    logits = max(peak - recompute_working_set(job), held) if apart else peak
    block, root = job.block_params_per_rank, job.root_params_per_rank  # as this TP rank holds them
    gathered = 0.0
    shards = job.shards
    if shards.weights > 1:
        if job.spec.shardings and job.sharding == "shard_grad_op":
            gathered = job.params_per_rank * E
        else:  # two blocks (the current one and the prefetched one) and the root module
            gathered = (2 * block + root) * E
        gathered += block * job.reduce_bytes
    elif job.offload:
        gathered = (2 * block + root) * E + block * job.reduce_bytes
    buckets = 0.0
    if job.spec.gradient_buckets and job.grad_ranks > 1:
        buckets = job.params_per_rank * job.state_bytes.grads
    if job.spec.deepspeed_engine and not job.software.own_optimizer and layout.zero_stage >= 1 \
            and job.ds_reduce_bucket:
        # ZeRO-1/2 copy gradients into a contiguous bucket of reduce_bucket_size elements in the model's dtype,
        # allocated whole however small the model, a second one with overlap_comm (DeepSpeedZeroOptimizer.
        # setup_buckets): 1 GB in 16 bits at DeepSpeed's default, 2 GB in fp32; ZeRO-3 allocates one such bucket
        # per gradient dtype when it initialises (stage3.py, the IPG buckets' buffer, with contiguous_gradients)
        copies = 2 if job.ds_overlap_comm and layout.zero_stage < 3 else 1  # overlap_comm: off by default below 3
        buckets += copies * job.ds_reduce_bucket * job.state_bytes.weights
    return logits + gathered + buckets + autocast_weight_copies(job)


def autocast_weight_copies(job: Job) -> float:
    """Under autocast each linear computes with a 16-bit copy of its fp32 weight and saves that copy for its
    backward, so a rank holds one for every linear whose forward was not checkpointed (a fully recomputed block
    saves none) and the output layer's (the embedding is not cast: embedding is not on autocast's lists). The
    copies cached during a checkpointed forward are freed when autocast's region ends, before the backward."""
    if not job.autocast:
        return 0.0
    saved = 1.0 - job.checkpoint_modes.get("full", 0.0)
    head = job.vocab_per_rank[0] * job.model.d_model
    return (layers_per_stage(job) * job.block_params_per_rank * saved + head) * job.act_bytes


def memory_per_device(job: Job, framework_overhead_bytes: float = 0.0) -> dict[str, float]:
    """Bytes per device of the busiest rank by category, and their total."""
    out = model_state_bytes(job.params_per_rank, job)
    out["activations"] = activation_bytes(job)
    out["buffers"] = buffer_bytes(job)
    out["overhead"] = framework_overhead_bytes
    out["total"] = sum(out.values())
    return out
