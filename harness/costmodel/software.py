"""Software profiles: what the training code does that the cost model must know, one profile per framework.

The same layout on the same machine runs at different speeds under different frameworks because they
store different activations, overlap different collectives and send different bytes between pipeline
stages. Each profile states those mechanisms, with the source of each. A run predicts with its own
backend's profile (`harness-<backend>`); `harness estimate`/`plan` take `costmodel.software=` to predict
any of them, and `costmodel.flash_attention=` to say which attention kernel that run used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from harness.core.errors import ConfigError
from harness.core.registry import backend_spec


@dataclass(frozen=True)
class VocabUnderTP:
    """How the vocabulary-sized layers (embedding, output layer, loss) run under tensor parallelism: what each TP
    rank holds and computes, and what it sends for them."""

    meaning: str
    embedding_split: bool
    """The embedding is vocabulary-parallel (else whole on every TP rank)."""
    head_split: bool
    """The output layer computes V/TP of the logits on each rank."""
    loss_split: bool
    """The loss runs across the ranks' logit slices: three all-reduces of b·s fp32 values (max, target logit, sum of
    exponentials), else over the whole vocabulary on every rank."""
    logits_gathered: bool = False
    """The split output layer's logits are all-gathered (b·s·V) for a whole-vocabulary loss."""
    head_input_reduced: bool = False
    """The output layer's replicated input has its gradient all-reduced (b·s·h), with or without sequence
    parallelism."""
    boundary: tuple[int, int, int] = (2, 0, 0)
    """Collectives of b·s·h per micro-batch where the residual stream enters and leaves the TP blocks: (all-gathers,
    reduce-scatters) with sequence parallelism, all-reduces without. Megatron (2, 2, 2): the vocab-parallel
    embedding's output reduced (scattered) in the forward and the head's input gathered, each with its backward
    counterpart. Gathered logits (2, 1, 1): the embedding is replicated, so entering costs only the backward's
    gather of the input gradient; the head's input is gathered in the forward and its gradient scattered. A
    replicated head (2, 0, 0): the first block takes its sequence chunk locally (its gradient gathered in the
    backward) and the last block's output is gathered for the head; without sequence parallelism nothing crosses."""


TP_VOCAB = {
    "split": VocabUnderTP(
        "Megatron's vocabulary-parallel embedding, column-parallel output layer and vocab-parallel cross entropy "
        "(megatron/core/tensor_parallel/cross_entropy.py)",
        embedding_split=True, head_split=True, loss_split=True, boundary=(2, 2, 2)),
    "gathered": VocabUnderTP(
        "the embedding replicated; the output layer column-parallel with its logits all-gathered to every rank "
        "(DTensor's ColwiseParallel(output_layouts=Replicate())), so each rank takes the loss over the whole "
        "vocabulary",
        embedding_split=False, head_split=True, loss_split=False, logits_gathered=True, boundary=(2, 1, 1)),
    "replicated": VocabUnderTP(
        "only the blocks are split: the embedding, the output layer and the loss run whole on every TP rank",
        embedding_split=False, head_split=False, loss_split=False),
    "loss_parallel": VocabUnderTP(
        "the embedding replicated; the output layer split over the vocabulary with its logits left split, and the "
        "loss taken across the ranks' slices (torch's loss_parallel, as Megatron's)",
        embedding_split=False, head_split=True, loss_split=True, head_input_reduced=True),
}
"""Software.tp_vocab: how the vocabulary-sized layers run under tensor parallelism."""


PP_PARTITIONS = ("megatron", "type:transformer", "type:transformer|embedding")
"""Software.pp_partition: how the blocks are split over pipeline stages. megatron: evenly, or with the embedding
and the output layer each in a block's place where the blocks alone do not divide (megatron-core's
account_for_embedding/loss_in_pipeline_split; the harness's torch pipelining, harness.core.registry.
pipeline_split); DeepSpeed's PipelineModule partition_method, which balances the layers its regex matches
(deepspeed/runtime/pipe/module.py `_partition_layers`, runtime/utils.py `partition_balanced`): `type:transformer`
the blocks alone (Megatron-DeepSpeed's default; the harness's deepspeed3d matches its blocks the same way),
`type:transformer|embedding` the embedding and the tied output layer as a block each (BLOOM's
--pp-partition-method)."""

ATTENTION_KERNELS = ("flash", "cudnn")
"""Software.attention_kernel: FlashAttention-2 (flash-attn, or SDPA's flash backend), cuDNN's fused attention."""
RING_ATTENTIONS = ("torch", "te")
"""Software.ring_attention: torch's context_parallel, Transformer Engine's ring (cp_comm_type "p2p")."""
SDPA_BACKENDS = {"FLASH_ATTENTION": "flash", "CUDNN_ATTENTION": "cudnn"}
"""PyTorch's SDPA backends (torch.nn.attention.SDPBackend names) that are one of ATTENTION_KERNELS."""


@dataclass(frozen=True)
class Software:
    """The mechanisms of one training framework the cost model distinguishes."""

    name: str = "harness"
    fused_attention: bool = True
    """Attention in one kernel (FlashAttention, SDPA): no s×s scores are stored, only a log-sum-exp per row."""
    attention_kernel: str = "flash"
    """Which fused kernel (ATTENTION_KERNELS): FlashAttention-2's, or cuDNN's, which PyTorch's SDPA prefers on
    Hopper since 2.9 with a recent cuDNN (pytorch/pytorch pull 162073; check_prefer_cudnn_attention in
    aten/src/ATen/native/transformers/cuda/sdp_utils.cpp); priced at the device's measured rate for that kernel
    (peaks.py), else FlashAttention-2's."""
    cudnn_head_dim_max: int = 128
    """The largest head dimension the software's attention dispatcher gives cuDNN's kernel (attention_kernel
    "cudnn"); a wider head runs FlashAttention-2. PyTorch's SDPA: 128 (`check_cudnn_tensor_shapes` in
    aten/src/ATen/native/transformers/cuda/sdp_utils.cpp). Transformer Engine on Hopper with cuDNN 9: 256
    (`nvte_get_fused_attn_backend`, transformer_engine/common/fused_attn/fused_attn.cpp at 3b2a7b0, the 1.14 code
    NeMo d2b2155 pins: head_dim_qk <= 256 for sm_arch >= 90 and cudnn >= 9.0)."""
    dropout: bool = False
    """Hidden/attention dropout: its masks are stored (Korthikanti et al. 2022, section 4.1)."""
    pp_partition: str = "megatron"
    """How the blocks are split over pipeline stages (PP_PARTITIONS): the busiest stage's compute is the most any
    stage holds, the output layer's on the last (layout.stage_loads)."""
    pp_scatter_gather: bool = False
    """Each TP rank sends 1/TP of a stage boundary's activations and the next stage all-gathers them over
    the node's links (Narayanan et al. 2021, section 4.1; DeepSpeed's pipeline `pipe_partitioned`)."""
    pp_sends_sequence_split: bool = False
    """With sequence parallelism a stage boundary stays split over the TP ranks, so each sends 1/TP of it and
    nothing is gathered (Megatron: the p2p tensor shape is seq/TP × micro-batch × hidden). The harness's
    stages hand over the replicated residual stream (harness/backends/fsdp.py apply_tensor_parallel)."""
    recompute_early_stop: bool = True
    """Recomputation stops at the last tensor the backward needs (PyTorch's non-reentrant checkpoint);
    Megatron's checkpoint re-runs the whole region (costmodel/flops.py recomputed_forward_per_token)."""
    grad_reduce_overlap: Optional[bool] = True
    """Data-parallel gradient reduction runs in buckets during the backward of the micro-batch that issues it;
    None: DeepSpeed's `zero_optimization.overlap_comm` decides (its default: on for ZeRO-3 only)."""
    param_gather_overlap: bool = False
    """A distributed optimizer's once-per-step parameter all-gather runs during the next forward
    (Megatron-LM `--overlap-param-gather`); FSDP's and ZeRO-3's per-layer gathers are prefetched anyway."""
    tp_comm_overlap: bool = False
    """TP all-gathers/reduce-scatters are split into TP chunks pipelined with their GEMMs (Megatron-LM
    `--tp-comm-overlap`, Transformer Engine userbuffers); sequence parallelism only (Megatron-LM's arguments.py
    asserts it), so a layout without it keeps its TP traffic exposed."""
    tp_regather_input: bool = False
    """With sequence parallelism each sub-layer's column-parallel linear keeps only its sequence-split input and
    all-gathers it again in the backward for its weight gradient: one more all-gather per sub-layer and backward
    (megatron-core's LinearWithGradAccumulationAndAsyncCommunication.backward under `ctx.sequence_parallel`;
    nanotron's tp_recompute_allgather, on by default). DTensor's ColwiseParallel saves the gathered input."""
    tp_backward_overlap: bool = False
    """A column-parallel linear's backward issues that all-gather before its input-gradient GEMM and the input
    gradient's reduce-scatter (all-reduce without sequence parallelism) before its weight-gradient GEMM, so each
    runs beside that GEMM and only what outlasts it is exposed (megatron-core, with CUDA_DEVICE_MAX_CONNECTIONS=1
    so the collective starts first: its async all-reduce without sequence parallelism, its sequence-parallel path
    with it; nanotron's tp_linear_async_communication). Otherwise every TP collective blocks."""
    tp_shard_overlap: bool = False
    """Beyond tp_backward_overlap, a column-parallel linear's forward all-gather runs beside the GEMM of the rank's
    own sequence chunk (1/TP of the GEMM), and a row-parallel linear's backward all-gather of its output gradient
    beside its own chunk's input-gradient GEMM (nanotron's _ColumnLinearAsyncCommunication.forward and
    _RowLinearAsyncCommunication.backward, parallel/tensor_parallel/functional.py)."""
    grad_accumulation_fusion: bool = False
    """The weight-gradient GEMM adds into the step's gradient in place (Megatron-LM's
    gradient_accumulation_fusion); otherwise each micro-batch's gradients are added by a separate,
    memory-bound pass (timing.py grad_accumulation_s)."""
    zero_bucket_allreduce: bool = False
    """ZeRO-1/2 reduce gradients the way DeepSpeed 0.19 (the version the harness pins) does by default: each bucket
    all-reduced whole (use_multi_rank_bucket_allreduce), twice a reduce-scatter's bytes (Job.ds_bucket_allreduce
    turns it off); otherwise a reduce-scatter, the volume of the older engines and of DeepSpeed's BF16_Optimizer's
    16-bit all-reduce of fp32 buffers that the Megatron-DeepSpeed tables describe as ZeRO-1."""
    zero_reduce_after_backward: bool = False
    """ZeRO's gradients are reduced after the last backward, in one all-reduce of the whole gradient buffer that
    nothing overlaps, not bucket by bucket during it (nanotron with fp32 accumulation and zero_stage > 0 builds no
    DDP, `trainer.py` init_model's make_ddp, and its training step calls sync_gradients_across_dp with
    reduce_scatter=False: `optim/gradient_accumulator.py` all_reduce of `_contiguous_fp32_grad_buffer`)."""
    grad_buckets: bool = False
    """Gradients are reduced bucket by bucket, each bucket its own collective and, with a distributed optimizer, its
    own parameter all-gather, so each pays the library's latency (comm.grad_bucket_count): megatron-core's
    DistributedDataParallel with overlap_grad_reduce, whose buckets hold `grad_bucket_params` parameters on the
    first pipeline stage's first model chunk and one bucket per model chunk elsewhere ("Turn off bucketing if we
    are on a pipeline stage that is not the first", megatron/core/distributed/distributed_data_parallel.py at
    aa6207e, megatron-core 0.11). Otherwise one collective per step over the whole buffer."""
    grad_bucket_params: Optional[int] = None
    """Parameters per bucket where the software buckets (costmodel.grad_bucket_params); None: megatron-core's default,
    max(40M, 1M × data-parallel ranks), 'to ensure that chunks used in NCCL ring-reduce implementations are large
    enough to remain bandwidth-bound rather than latency-bound' (the same file)."""
    own_optimizer: bool = False
    """The framework's own data-parallel optimizer replaces DeepSpeed's engine under the deepspeed3d backend
    (Megatron-LM's DistributedOptimizer and contiguous grad buffer, nanotron's ZeRO-1 optimizer): none of
    DeepSpeed's preallocated gradient buckets (memory.buffer_bytes)."""
    main_grad_bytes: Optional[int] = None
    """Gradients are accumulated into a separate buffer of this many bytes per parameter (Megatron's fp32
    `main_grad`, DeepSpeed's BF16 optimizer), every micro-batch; None: into `.grad` itself, after the first."""
    fp32_grads_in_bf16: bool = False
    """In bf16 runs the gradients are kept in fp32 (4 bytes per parameter) and the data-parallel reduction carries
    4 bytes per parameter: Megatron-LM forces accumulate_allreduce_grads_in_fp32 for bf16
    (megatron/training/arguments.py, "bfloat16 requires gradient accumulation and all-reduce to be done in fp32"),
    nanotron reduces its accumulate_grad_in_fp32 buffers (optim/gradient_accumulator.py get_fp32_accum_hook).
    DeepSpeed's BF16_Optimizer keeps fp32 buffers too (bf16_optimizer.py get_grads_for_reduction), but its engine
    casts them to communication_data_type, bf16, before it all-reduces them (engine.py allreduce_bucket; the tied
    embedding's `_hp_grad` goes in fp32, pipe/engine.py `_exec_reduce_tied_grads`), as LUMI's 176B log shows: the
    step's two gradient all-reduces carry 2 bytes per parameter of the stage, the tied one 4. That bf16 all-reduce
    and the bf16 parameter all-gather after the sharded step move 4 + 2 bytes per parameter, as much as the fp32
    reduce-scatter and bf16 all-gather of ZeRO-1, which is how the Megatron-DeepSpeed tables describe that
    optimizer (parallel.zero_stage=1), so the flag gives those runs the right bytes."""
    p2p_overlap: bool = False
    """Pipeline sends overlap the next micro-batch's compute, so only the fill and drain transfers are on the
    critical path (Megatron-LM's interleaved schedule, `overlap_p2p_comm`); with virtual stages only: Megatron turns
    it off for plain 1F1B, whose schedule refuses it (timing.step_time)."""
    # Which memory-bound kernels are fused (kernels.py costs each kernel the software launches).
    compiled: bool = False
    """torch.compile (inductor) fuses each chain of elementwise kernels (norm with its residual add, RoPE, the
    activation) into one: each chain reads its inputs and writes its outputs once."""
    compile_whole_model: bool = False
    """torch.compile wraps the whole model, so the final norm is fused too; otherwise only each block is compiled
    (the harness, harness/backends/base.py). The loss sits outside the compiled module either way."""
    rmsnorm_composite: bool = False
    """RMSNorm is written as PyTorch operations in fp32, each its own kernel in eager mode (kernels.
    RMSNORM_COMPOSITE_BYTES); otherwise one kernel (nn.RMSNorm's fused CUDA kernel, apex, Transformer Engine)."""
    fused_cross_entropy: bool = False
    """The loss reads the logits and writes their gradient once (a fused or chunked cross entropy); otherwise an
    eager one (`vocab_parallel_loss` says which)."""
    fused_vocab_parallel_loss: bool = False
    """Megatron's vocab-parallel loss through megatron-core's cross_entropy_loss_fusion (costmodel.
    cross_entropy_loss_fusion; on in NeMo 2.0's GPTConfig, off by default in Megatron-LM): its steps compiled into
    four kernels (kernels.LOSS_BYTES_VOCAB_PARALLEL_FUSED)."""
    megatron_qkv_split: bool = False
    """megatron-core's attention takes q, k and v from the fused QKV linear's output as views and hands them to
    Transformer Engine, which copies what is not laid out for it (kernels.qkv_layout_kernels)."""
    ring_attention: str = "torch"
    """Whose ring context parallelism runs (RING_ATTENTIONS), for the copies, casts and merges it makes beside its
    attention calls (kernels.ring_attention_kernels): torch's `context_parallel` (_templated_ring_attention and its
    fp32 _SDPAMerger) or Transformer Engine's AttnFuncWithCPAndKVP2P."""
    vocab_parallel_loss: bool = False
    """The loss is Megatron's vocab_parallel_cross_entropy, an eager pass per operation over fp32 logits (kernels.
    LOSS_BYTES_VOCAB_PARALLEL), at any TP degree; otherwise PyTorch's cross entropy (kernels.LOSS_BYTES_EAGER)."""
    loss_in_compute_dtype: bool = False
    """The eager cross entropy runs on the 16-bit logits as the output layer returns them, with no fp32 copy: its
    log-softmax is 16-bit too (kernels.LOSS_BYTES_EAGER, memory.loss_bytes). Otherwise it upcasts them first, as
    the harness's model (models/gpt.py) and Megatron's (fp16_lm_cross_entropy off by default) do."""
    loop_holds_logits: bool = False
    """The training loop keeps the logits until the backward is done (`logits = model(x); loss =
    F.cross_entropy(logits, ...); loss.backward()`), so they sit beside the loss's backward (memory.loss_bytes);
    otherwise the model returns only the loss and frees them after its forward (the harness's models/gpt.py)."""
    fused_bias_dropout_add: bool = False
    """Bias, dropout and the residual add in one kernel (Megatron's bias_dropout_add_fusion)."""
    fused_activation: bool = False
    """The MLP's activation in one kernel (Megatron's bias_gelu_fusion, its fused SwiGLU)."""
    fused_rope: bool = False
    """Rotary embeddings applied by one kernel (Megatron with Transformer Engine or apex)."""
    attention_reshape_passes: tuple[float, float] = (0.0, 0.0)
    """Copies the software's reshapes around the attention kernel make, as passes (forward, backward) over one
    layer's tokens × hidden / TP elements of the activation dtype. nanotron (models/llama.py, CausalSelfAttention):
    its merged q/k/v output permuted into contiguous q, k and v (3 tensors read and written: 6), k and v
    concatenated (4) and permuted into a contiguous block for the rotary kernel (4); in the backward their
    gradients concatenated (4), stacked (6) and copied back to the merged layout (6)."""
    attention_reshape_kernels: tuple[float, float] = (0.0, 0.0)
    """The kernels those copies launch (forward, backward): nanotron's three permuted copies, the cat and the
    rotary block's copy (5), then the cat, the stack and the copy back (3)."""
    seq_first_proj_copy: bool = False
    """The output projection's input arrives transposed to a sequence-first layout ([s, b, h], nanotron's), which
    F.linear copies to make it contiguous (2 passes over tokens × hidden / TP), and its gradient is copied twice on
    the way back (4); not at micro-batch 1, where the transpose is already contiguous."""
    split_glu: bool = False
    """An unfused GLU activation splits one merged gate/up output (nanotron's GLUActivation: torch.split), so its
    backward concatenates the two halves' gradients: 4 more passes over tokens × FFN / TP."""
    fused_softmax: bool = False
    """Without a fused attention kernel: scale, mask and softmax in one kernel (Megatron's
    FusedScaleMaskSoftmax); otherwise PyTorch's cast, mask, softmax and cast, in fp32."""
    optimizer: str = "foreach"
    """AdamW's implementation: fused (one kernel per group of tensors: apex/DeepSpeed/Transformer Engine
    FusedAdam, torch's fused=True), foreach (torch's default on GPUs: several multi-tensor kernels, each a pass)
    or loop (a pass per operation per tensor)."""
    tp_vocab: str = "split"
    """How the input embedding, the output layer and the loss run under tensor parallelism (TP_VOCAB)."""
    tp_vocab_untied: Optional[str] = None
    """The same for a model whose output layer has its own weight (not the embedding's) and holds all stages
    (pipeline stages leave the loss to the schedule); None: `tp_vocab`."""
    tp_gather_per_projection: bool = False
    """Each column-parallel projection brings in its own copy of its input: separate q, k, v (and with SwiGLU gate
    and up) linears under DTensor's ColwiseParallel(input_layouts=Shard(1)) all-gather the sequence-split input
    once each in the forward and reduce-scatter its gradient once each in the backward (without sequence
    parallelism: an all-reduce each in the backward); otherwise one gather per sub-layer (Megatron's fused QKV
    and FC1, the harness's PrepareModuleInput)."""
    fsdp_defers_grad_sync: bool = True
    """Accumulating micro-batches, FSDP2 skips the reduce-scatter of all but the last (set_requires_gradient_sync(
    False): the harness through Fabric's no_backward_sync, KempnerForge's maybe_no_sync), holding every gradient
    unsharded in the reduce dtype meanwhile (Job.unsharded_grad_bytes); False where the software reduce-scatters in
    every micro-batch's backward and accumulates the sharded gradients (torchtitan's default without HSDP; NeMo
    AutoModel's defer_fsdp_grad_sync: False): more traffic, none of the unsharded gradients' memory (not in pipeline
    stages: Job.fsdp_reduces_every_micro_batch)."""
    fsdp_on_one_device: bool = True
    """FSDP2 wraps a run of one device too (the harness's FSDP backend shards every run); False where the software
    builds no mesh there and trains the plain model (KempnerForge: init_distributed returns no mesh at world size
    1, so apply_fsdp2 is skipped and autograd accumulates the gradients in the parameters' dtype)."""
    states_in_compute_dtype: bool = False
    """The parameters are stored in the 16-bit compute dtype, so their gradients and AdamW's moments are too: 8 bytes
    of model state per parameter instead of mixed precision's fp32 weights, gradients and moments (16)."""
    autocast_casts: bool = False
    """The run computes under torch.autocast over fp32 weights (PyTorch DDP, a plain script): each weight is cast
    to the compute dtype at its use in a micro-batch's forward and its gradient cast back to fp32 in the backward,
    and the residual stream stays fp32, with its norms, and each norm's output cast for the linear after it
    (layout.Job.stream_bytes). FSDP2 casts once per all-gather, DeepSpeed and Megatron keep 16-bit weights."""
    norm_grads_in_one_kernel: bool = False
    """The norm's backward writes its weight's gradient as per-block partial sums from the input gradient's kernel
    (flash-attn's Triton layer_norm, nanotron's TritonRMSNorm; Transformer Engine's norms): 3 passes instead of
    the 5 of PyTorch's native norms and apex's, whose weight gradient is a second kernel (kernels.NORM_PASSES)."""
    run_flags: bool = False
    """The framework takes torch.compile and the optimizer implementation from the run's own train.compile and
    train.optimizer (the harness's backends; a published table's rows say what each of its runs used)."""
    source: str = ""

    def __post_init__(self) -> None:
        if self.ring_attention not in RING_ATTENTIONS:
            raise ValueError(f"ring_attention={self.ring_attention}: one of {', '.join(RING_ATTENTIONS)}")
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention_kernel={self.attention_kernel}: one of {', '.join(ATTENTION_KERNELS)}")
        if self.pp_partition not in PP_PARTITIONS:
            raise ValueError(f"pp_partition={self.pp_partition}: one of {', '.join(PP_PARTITIONS)}")
        for mode in (self.tp_vocab, self.tp_vocab_untied or self.tp_vocab):
            if mode not in TP_VOCAB:
                raise ValueError(f"tp_vocab={mode}: one of {', '.join(TP_VOCAB)}")
        if self.rmsnorm_composite and self.autocast_casts:
            raise ValueError("rmsnorm_composite with autocast_casts: the composite norm's fp32 casts are counted as "
                             "16-bit to fp32 and back, which autocast's fp32 stream does not make")
        if self.vocab_parallel_loss and self.loss_in_compute_dtype:
            raise ValueError("vocab_parallel_loss with loss_in_compute_dtype: Megatron's 16-bit loss is not modelled")

    @property
    def loss_kind(self) -> str:
        """Which loss the software runs, as the kernels (kernels.LOSS_PASSES) and memory (memory.loss_bytes) cost
        it: fused, Megatron's vocab-parallel, or PyTorch's eager cross entropy."""
        if self.fused_cross_entropy:
            return "fused"
        if self.vocab_parallel_loss:
            return "vocab_parallel_fused" if self.fused_vocab_parallel_loss else "vocab_parallel"
        return "eager"

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_PYTORCH = dict(fused_attention=True, dropout=False, recompute_early_stop=True)
_MEGATRON_KERNELS = dict(fused_bias_dropout_add=True, fused_activation=True, fused_rope=True, fused_softmax=True,
                         optimizer="fused", vocab_parallel_loss=True)
PROFILES: dict[str, Software] = {s.name: s for s in (
    Software(name="harness-ddp", **_PYTORCH, grad_reduce_overlap=True, autocast_casts=True, run_flags=True,
             source="models/gpt.py (SDPA, no dropout); PyTorch DDP's reducer all-reduces gradient buckets as "
                    "they become ready, in the last micro-batch's backward (no_sync before it)"),
    Software(name="harness-fsdp", **_PYTORCH, grad_reduce_overlap=True, run_flags=True, tp_vocab="replicated",
             tp_vocab_untied="loss_parallel",
             source="FSDP2 prefetches each block's all-gather and reduce-scatters each block's gradients during "
                    "the backward (torch.distributed.fsdp.fully_shard); tensor parallelism splits the blocks, and the "
                    "output layer with a vocab-parallel loss where its weight is its own (harness/backends/fsdp.py "
                    "apply_tensor_parallel, vocab_parallel_head); torch.distributed.pipelining waits on each "
                    "receive before the compute that needs it, so its sends are not overlapped here"),
    Software(name="harness-deepspeed", **_PYTORCH, grad_reduce_overlap=None, optimizer="fused", run_flags=True,
             zero_bucket_allreduce=True,
             source="DeepSpeed ZeRO reduces gradients in hooks during the backward only with "
                    "zero_optimization.overlap_comm (deepspeed/runtime/zero/config.py: default on for stage 3)"),
    Software(name="harness-deepspeed3d", **_PYTORCH, grad_reduce_overlap=False, optimizer="fused", run_flags=True,
             zero_bucket_allreduce=True, tp_regather_input=True,
             pp_partition="type:transformer",
             vocab_parallel_loss=True,
             source="DeepSpeed's pipeline engine reduces gradients and tied weights after the last micro-batch "
                    "(deepspeed/runtime/pipe/engine.py _exec_reduce_grads, _exec_reduce_tied_grads); the loss is "
                    "megatron-core's vocab_parallel_cross_entropy on fp32 logits (harness/backends/deepspeed3d.py); "
                    "its linears are megatron-core's ColumnParallelLinear/RowParallelLinear, which gather a "
                    "sequence-parallel input again in the backward; no TP overlap is credited, since the harness "
                    "does not set CUDA_DEVICE_MAX_CONNECTIONS=1, which megatron-core's layers.py calls 'necessary "
                    "for a speedup' (it orders each collective before the GEMM it should overlap)"),
    Software(name="megatron-lm-2021", **_MEGATRON_KERNELS, fp32_grads_in_bf16=True, fused_attention=False,
             dropout=True, pp_scatter_gather=True,
             recompute_early_stop=False, grad_reduce_overlap=False, main_grad_bytes=4,
             own_optimizer=True,
             source="Megatron-LM as measured in Narayanan et al. 2021: unfused attention storing scores, softmax "
                    "and dropout masks (Korthikanti et al. 2022, 4.1); scatter/gather of pipeline sends (sec. 4.1); "
                    "gradients all-reduced after the pipeline flush; blocking point-to-point sends; fp32 main_grad "
                    "accumulation by a separate add (gradient_accumulation_fusion came later)"),
    Software(name="megatron-lm", **_MEGATRON_KERNELS, fp32_grads_in_bf16=True, pp_sends_sequence_split=True,
             norm_grads_in_one_kernel=True,
             fused_attention=True, dropout=True, pp_scatter_gather=True,
             recompute_early_stop=False, grad_reduce_overlap=True, param_gather_overlap=True, p2p_overlap=True,
             grad_accumulation_fusion=True, tp_regather_input=True, tp_backward_overlap=True,
             own_optimizer=True, attention_kernel="cudnn", cudnn_head_dim_max=256, grad_buckets=True,
             megatron_qkv_split=True, ring_attention="te",
             source="megatron-core with the flags its performance recipes set: --use-distributed-optimizer "
                    "--overlap-grad-reduce --overlap-param-gather (megatron/core/distributed/"
                    "distributed_data_parallel_config.py), overlap_p2p_comm for the interleaved schedule (on by "
                    "default), gradient_accumulation_fusion (on by default), flash attention; its tensor-parallel "
                    "linears' backward (megatron/core/tensor_parallel/layers.py "
                    "LinearWithGradAccumulationAndAsyncCommunication, Transformer Engine's likewise) gathers a "
                    "sequence-parallel input again and runs that gather and the input gradient's reduce-scatter "
                    "(all-reduce) beside its GEMMs; "
                    "Transformer Engine's attention in its default layer spec, which gives cuDNN's fused attention "
                    "preference over FlashAttention on Hopper ('Disabling FlashAttention to give FusedAttention "
                    "preference on Hopper+ for performance reasons', transformer_engine/pytorch/attention.py "
                    "get_attention_backend); "
                    "Transformer Engine's norms in its default layer spec (their backward writes the weight "
                    "gradient as per-CTA partial sums from the input gradient's kernel and a finalize kernel adds "
                    "the partials: "
                    "NVIDIA/TransformerEngine transformer_engine/common/normalization/layernorm/ln_bwd_kernels.cuh); "
                    "--tp-comm-overlap is opt-in (needs Transformer Engine userbuffers): "
                    "select it with costmodel.tp_comm_overlap=true"),
    Software(name="megatron-deepspeed", **_MEGATRON_KERNELS, fp32_grads_in_bf16=True, pp_sends_sequence_split=True,
             pp_partition="type:transformer",
             fused_attention=False, dropout=True, pp_scatter_gather=True,
             recompute_early_stop=False, grad_reduce_overlap=False, main_grad_bytes=4,
             source="Megatron-DeepSpeed (BigScience, Frontier ports): Megatron's layers and fused softmax on "
                    "DeepSpeed's pipeline engine, which partitions sends over TP ranks (pipeline.pipe_partitioned, "
                    "default on), reduces gradients after the last micro-batch and sends blocking; gradients "
                    "accumulate into fp32 buffers by hooks (deepspeed/runtime/bf16_optimizer.py; the Frontier port "
                    "turned gradient_accumulation_fusion off)"),
    Software(name="nanotron", **_PYTORCH, grad_reduce_overlap=True, main_grad_bytes=4, fp32_grads_in_bf16=True,
             norm_grads_in_one_kernel=True, zero_reduce_after_backward=True,
             tp_regather_input=True, tp_backward_overlap=True, tp_shard_overlap=True,
             fused_rope=True, optimizer="fused", vocab_parallel_loss=True, attention_reshape_passes=(14.0, 16.0),
             attention_reshape_kernels=(5.0, 3.0),
             seq_first_proj_copy=True, split_glu=True,
             own_optimizer=True,
             source="nanotron as its scaling benchmark ran it (github.com/huggingface/nanotron: "
                    "scripts/scaling_benchmarks.py at e24d248 and src/nanotron at that commit): "
                    "FlashAttention-2's flash_attn_varlen_func, flash-attn's fused rotary embedding, TritonRMSNorm "
                    "(flash-attn's ops/triton/layer_norm.py, whose backward kernel writes the weight gradient's "
                    "per-block partial sums beside the input gradient), "
                    "the residual add and SiLU-times-up (GLUActivation, torch.split of the merged gate/up output) as "
                    "eager kernels, fused q/k/v and gate/up projections with the copies their reshapes make "
                    "(permute(...).contiguous() of q/k/v, torch.cat of k and v, the sequence-first o_proj input), "
                    "vocabulary-parallel embedding, output layer and sharded_cross_entropy in fp32 "
                    "(models/llama.py); bf16 weights with fp32 master weights, gradients accumulated into fp32 "
                    "buffers that DDP's comm hook all-reduces bucket by bucket in the last "
                    "micro-batch's backward (optim/gradient_accumulator.py get_fp32_accum_hook, no_sync before it "
                    "in parallel/pipeline_parallel/engine.py), and under ZeRO-1 no DDP: one all-reduce of the whole "
                    "fp32 buffer after the backward (trainer.py make_ddp, sync_gradients_across_dp); torch's fused "
                    "AdamW (torch_adam_is_fused); tp_linear_async_communication (the benchmark config's) and "
                    "tp_recompute_allgather (nanotron's default, config/parallelism_config.py): each column-parallel "
                    "linear gathers its input again in the backward, and its gathers and its input gradient's "
                    "reduce-scatter run beside its GEMMs (parallel/tensor_parallel/functional.py)"),
    Software(name="pytorch-autocast-script", **_PYTORCH, autocast_casts=True, run_flags=True, loop_holds_logits=True,
             attention_reshape_passes=(0.0, 39.0), attention_reshape_kernels=(0.0, 9.0),
             source="a single-process PyTorch training script in the minGPT style, as the Kempner Institute's GPU "
                    "benchmark writes it (KempnerInstitute/kempner-computing-handbook, kempner_computing_handbook/"
                    "technical_blog/choosing_gpu_partition.md at c8d6760, gpu_bench.py): fp32 weights under "
                    "torch.autocast(bfloat16), nn.LayerNorm, biased nn.Linear, exact GELU, SDPA, F.cross_entropy on "
                    "the logits the loop holds, no DDP; q, k and v taken from the merged projection by indexing "
                    "(qkv.view(...).permute(...)[0], [1], [2]), so each select's backward allocates a zeroed tensor of "
                    "the whole q/k/v size and copies its gradient in (3 × (3 + 2) passes over one layer's tokens × "
                    "hidden), autograd sums the three (2 × 9) and the view's backward copies the permuted sum (6): "
                    "39 passes in the backward in 9 kernels (3 fills, 3 copies, 2 adds, 1 copy), none in the forward "
                    "(the permuted views reach SDPA uncopied)"),
    Software(name="kempnerforge", **_PYTORCH, grad_reduce_overlap=True, run_flags=True, compile_whole_model=True,
             fsdp_on_one_device=False,
             tp_vocab="gathered", tp_gather_per_projection=True, rmsnorm_composite=True, states_in_compute_dtype=True,
             loss_in_compute_dtype=True, loop_holds_logits=True,
             attention_kernel="cudnn",
             source="KempnerForge at 01b461a (github.com/KempnerInstitute/KempnerForge), the code of its MFU "
                    "benchmark: the model cast to bf16 before FSDP2 (model.to(param_dtype)) with reduce_dtype fp32 "
                    "(kempnerforge/distributed/parallel.py), "
                    "set_requires_gradient_sync(False) before the last micro-batch (kempnerforge/training/grad.py); "
                    "TP with sequence parallelism, ColwiseParallel(input_layouts=Shard(1)) on each of q, k, v, gate "
                    "and up, the token embedding replicated and the output head's logits gathered to Replicate "
                    "(kempnerforge/distributed/tensor_parallel.py); RMSNorm as fp32 PyTorch operations "
                    "(kempnerforge/model/norm.py); SDPA with its backend left to PyTorch (model.sdpa_backend "
                    "'auto', kempnerforge/model/attention.py), which ran cuDNN's kernels in KempnerForge's own trace "
                    "of a 13B run on H200 (aten::_cudnn_attention_backward, 800 calls: "
                    "benchmarks/profiling/13b_24gpu_profiling.md); torch.compile(model) with the loss, "
                    "F.cross_entropy on the bf16 logits, outside it, the logits held until loss.backward(), and "
                    "total_loss += loss.item() after each micro-batch's backward (scripts/train.py)"),
)}


RUN_SWITCHES = {"flash_attention": "fused_attention", "tp_comm_overlap": "tp_comm_overlap",
                "attention_kernel": "attention_kernel", "pp_partition": "pp_partition",
                "grad_reduce_in_fp32": "fp32_grads_in_bf16", "fsdp_defer_grad_sync": "fsdp_defers_grad_sync",
                "grad_bucket_params": "grad_bucket_params", "cross_entropy_loss_fusion": "fused_vocab_parallel_loss"}
"""The `costmodel.*` keys that state what a run did where its profile assumes otherwise, each with the Software
field it sets."""


def software_for(cfg: Any) -> Software:
    """The profile a config names (`costmodel.software`, default: the run's backend's own), with the
    run-specific switches (RUN_SWITCHES) applied."""
    section = getattr(cfg, "costmodel", None)
    name = getattr(section, "software", None) or backend_spec(cfg.backend.name).software
    if name not in PROFILES:
        raise ConfigError(f"costmodel.software={name}: unknown; choose one of {', '.join(PROFILES)}")
    profile = PROFILES[name]
    changes = {key: getattr(section, key) for key in RUN_SWITCHES
               if section is not None and getattr(section, key, None) is not None}
    if changes.get("attention_kernel", ATTENTION_KERNELS[0]) not in ATTENTION_KERNELS:
        raise ConfigError(f"costmodel.attention_kernel={changes['attention_kernel']}: unknown; choose one of "
                          f"{', '.join(ATTENTION_KERNELS)}")
    if changes.get("pp_partition", PP_PARTITIONS[0]) not in PP_PARTITIONS:
        raise ConfigError(f"costmodel.pp_partition={changes['pp_partition']}: unknown; choose one of "
                          f"{', '.join(PP_PARTITIONS)}")
    if changes.get("grad_bucket_params") is not None and changes["grad_bucket_params"] <= 0:
        raise ConfigError(f"costmodel.grad_bucket_params={changes['grad_bucket_params']}: a bucket holds at least one "
                          "parameter; give the run's bucket size or leave it unset for megatron-core's default")
    parallel = getattr(cfg, "parallel", None)
    if changes.get("tp_comm_overlap") and parallel is not None and parallel.tp > 1 \
            and not parallel.sequence_parallel:
        raise ConfigError(f"costmodel.tp_comm_overlap=true with parallel.tp={parallel.tp} and no sequence "
                          "parallelism: Megatron-LM overlaps the sequence-parallel all-gathers and reduce-scatters "
                          "with their GEMMs and refuses the overlap without them; set "
                          "parallel.sequence_parallel=true or drop costmodel.tp_comm_overlap")
    changes = {RUN_SWITCHES[key]: value for key, value in changes.items()}
    train = getattr(cfg, "train", None)
    if profile.run_flags and train is not None:
        if getattr(train, "compile", False):
            changes["compiled"] = True
        optimizer = OPTIMIZER_KERNELS.get(getattr(train, "optimizer", "auto"))
        if optimizer is not None:
            changes["optimizer"] = optimizer
    return dataclasses.replace(profile, **changes) if changes else profile


OPTIMIZER_KERNELS = {"adamw": "foreach", "adamw_foreach": "foreach", "adamw_fused": "fused",
                     "apex_fused_adam": "fused", "deepspeed_fused_adam": "fused"}
"""train.optimizer as the kernels it launches (torch's AdamW defaults to foreach on GPUs); auto: the profile's."""
