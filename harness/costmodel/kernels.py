"""One micro-batch on one rank as the kernels the software launches, each costed as a roofline.

A transformer layer (and the embedding, the output layer with its loss, and the optimizer step) is a list of
kernels: the GEMMs of the model's linears (the model's description, harness.models.config.block_linears, split
as tensor parallelism splits them), the attention kernel, and the memory-bound kernels around them (norms,
rotary embeddings, the activation, dropout and residual adds, casts, the loss over the vocabulary). A kernel
takes max(FLOPs / the achievable rate of its class, bytes / the achievable memory bandwidth). Which kernels are
fused is the software profile's (software.py: torch.compile, Megatron's fused kernels, the attention kernel, the
optimizer's implementation). The achievable rates are one named input, `Rates`: the device's published
measurements (peaks.py: large-GEMM efficiency, FlashAttention-2, STREAM), a system profile's own figures, or
`harness calibrate`'s.

Bytes per element: a pass reads or writes the tensor once in the activation dtype (E bytes); PyTorch's
unfused kernels read their inputs and write their outputs, so e.g. an eager residual add is 3 passes (read two,
write one) and its backward, where autograd sums the two branches' gradients, 3 more. The counts below are per
element of the tensor each kernel works on, forward and backward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

from harness.core.registry import CHECKPOINTING
from harness.costmodel.layout import Job
from harness.costmodel.peaks import GemmShape
from harness.costmodel.software import Software

ROPE_PASSES = 9.0
"""Eager rotary embeddings on q and k (harness.models.gpt.apply_rope): neg of a half (1), cat (2), two muls
(2 + 2) and an add (3): passes over q and k; 2 when fused."""
NORM_PASSES = (2.0, 3.0, 2.0)
"""A norm: forward reads its input and writes its output; backward reads the input and the output gradient and
writes the input gradient; and where the weight's (and bias's) gradient is a kernel of its own, that kernel reads
the output gradient and the input again (PyTorch's native LayerNorm and RMSNorm, layer_norm_kernel.cu
`GammaBetaBackward`; apex's and Megatron's fused norms, `cuComputePartGradGammaBeta`), unless the input gradient's
kernel also writes per-block partial sums for it (Software.norm_grads_in_one_kernel), as PyTorch's CPU kernel does
(layer_norm_kernel.cpp: one pass over the rows with per-thread weight-gradient buffers)."""
RMSNORM_COMPOSITE_BYTES = 32.0
"""An RMSNorm written as PyTorch operations in fp32 (Llama's reference code: x.float(), pow, mean, rsqrt, mul,
mul by the weight, cast back), per element in the forward: cast (E + 4), pow (8), mean (4), mul (8), weight
mul (8), cast back (4 + E) = 32 + 2E bytes; autograd runs each operation's backward, reading its saved inputs and
the incoming gradient: twice the forward's."""

SOFTMAX_PASSES_EAGER = 24.0
"""PyTorch's math attention per score element, in bytes: cast to fp32 (E + 4), mask (8), softmax (8), cast back
(4 + E) forward, as many backward: counted as 24 + 2E per direction (E added where used)."""
LOSS_PASSES = {"fused": 2, "eager": 6, "vocab_parallel": 8, "vocab_parallel_fused": 4}
"""Kernels each loss launches over the logits (forward and backward), counted as the bytes below are."""
LOSS_BYTES_EAGER = 24.0
"""The loss over the logits per element, PyTorch's cross entropy on fp32 logits: cast (E + 4), log-softmax (8),
its gradient (8), cast back (4 + E): 24 + 2E bytes; on the 16-bit logits themselves (Software.
loss_in_compute_dtype) the log-softmax and its gradient only, 4E; a fused cross entropy reads the logits and
writes their gradient once (2E)."""
LOSS_BYTES_VOCAB_PARALLEL = 48.0
"""The same for Megatron's vocab_parallel_cross_entropy (megatron/core/tensor_parallel/cross_entropy.py; nanotron's
sharded_cross_entropy is a copy), one eager pass per operation over the fp32 logits: cast (E + 4), max (4), subtract
the max (8), exp in place (8), sum (4), divide in place (8) forward; multiply by the incoming gradient (8) and cast
back (4 + E) backward: 48 + 2E bytes, also at TP 1, where it runs over the whole vocabulary."""
LOSS_BYTES_VOCAB_PARALLEL_FUSED = 28.0
"""The same through megatron-core's cross_entropy_loss_fusion (megatron/core/fusions/fused_cross_entropy.py at
aa6207e, megatron-core 0.11, its steps under jit_fuser, torch.compile): the cast and the max in one kernel (E + 4),
the subtraction, exp and sum in place in one (8), the division in place (8) forward; the gradient from the saved
softmax in one kernel that writes the softmax back and the 16-bit gradient (8 + E) backward: 28 + 2E bytes in 4
kernels."""
OPTIMIZER_BYTES = {"fused": 28.0, "foreach": 64.0, "loop": 64.0}
"""AdamW per parameter on its rank: fused reads the fp32 weight, gradient and both moments and writes the
weight and moments once (7 × 4 bytes); torch's foreach and loop implementations run a kernel per operation
(lerp, mul, addcmul, sqrt, div, add), each reading and writing whole tensors (about 16 passes of 4 bytes)."""
OPTIMIZER_KERNELS_PER_TENSOR = {"fused": 0.0, "foreach": 0.0, "loop": 8.0}
"""Kernels launched per parameter tensor: the loop implementation launches its operations tensor by tensor."""


def norm_kernel(name: str, elements: float, job: Job, fwd_only: bool = False) -> Kernel:
    """One norm over `elements`, forward and (unless `fwd_only`) backward: one kernel, or the software's composite
    RMSNorm (seven operations, each a kernel and a pass in each direction). Under autocast the norm runs on the
    fp32 stream and its output is cast for the next linear (read 4, write E; its backward casts the gradient
    back)."""
    E, sw = job.stream_bytes, job.software
    if job.model.norm == "rmsnorm" and sw.rmsnorm_composite:
        fwd = RMSNORM_COMPOSITE_BYTES + 2 * E
        bwd, fwd_kernels, bwd_kernels = 2 * fwd, 7, 7
    else:
        separate = 0 if sw.norm_grads_in_one_kernel or job.device == "cpu" else 1
        fwd, bwd = NORM_PASSES[0] * E, (NORM_PASSES[1] + separate * NORM_PASSES[2]) * E
        fwd_kernels, bwd_kernels = 1, 1 + separate
    if job.autocast:
        cast = E + job.act_bytes  # the output cast for the next linear, and its gradient cast back
        fwd, bwd, fwd_kernels, bwd_kernels = fwd + cast, bwd + cast, fwd_kernels + 1, bwd_kernels + 1
    return Kernel(name, "memory", bytes=elements * (fwd if fwd_only else fwd + bwd),
                  count=fwd_kernels + (0 if fwd_only else bwd_kernels))


@dataclass(frozen=True)
class Rates:
    """The achievable rate of each kernel class on one device: the compute side's one hardware input."""

    gemm_flops: float
    """A large GEMM's FLOP/s (the dense peak × its measured efficiency)."""
    gemm_half_flops: float
    """The GEMM size at which a GEMM reaches half of it: a fixed cost per GEMM kernel."""
    memory_bw: Optional[float]
    """Bytes/s a memory-bound kernel moves (the memory bandwidth × its measured streaming efficiency)."""
    attention_flops: Optional[float]
    """A fused attention kernel's forward + backward FLOP/s for this model's shape (FlashAttention's count);
    None: no measurement, so the large-GEMM rate."""
    launch_s: float = 0.0
    """Host time to launch one kernel (eager PyTorch: dispatch and launch); a GPU hides it behind kernels that take
    longer, a CPU pays it on top."""
    units: Optional[int] = None
    """SMs/CUs a GEMM's output tiles fill in waves (None: no wave quantization)."""
    startup_s: float = 0.0
    """Device time each memory-bound or attention kernel costs beyond its bytes or FLOPs, back to back on a stream
    (peaks.kernel_startup_us); a GEMM's fixed cost is gemm_half_flops."""
    gemm_shape: GemmShape = GemmShape()
    """The tiles a GEMM's library chooses among and its inner-dimension cost (peaks.GemmShape)."""


@dataclass(frozen=True)
class Kernel:
    """One kernel (or a kind of kernel repeated `count` times) of a micro-batch's forward and backward."""

    name: str
    kind: str
    """gemm | attention | memory."""
    flops: float = 0.0
    bytes: float = 0.0
    count: float = 1.0
    shape: tuple[int, int] = (0, 0)
    """A GEMM's output rows and columns (for its tile and wave quantization)."""


GEMM_TILE = (256, 128)
"""Output tile of the large 16-bit GEMM kernels (NVIDIA, 'Matrix Multiplication Background User's Guide':
tile and wave quantization, with the A100's 256×128 example)."""


def wave_efficiency(rows: int, cols: int, units: Optional[int], tile: tuple[int, int] = GEMM_TILE) -> float:
    """Share of the launched tile work that is useful: the output is cut into tiles, which run in waves of
    one tile per SM/CU; partial tiles and a partial last wave compute for nothing."""
    if units is None or rows <= 0 or cols <= 0:
        return 1.0
    tiles = -(-rows // tile[0]) * -(-cols // tile[1])
    waves = -(-tiles // units)
    return rows * cols / (waves * units * tile[0] * tile[1])


@functools.lru_cache(maxsize=65536)
def shape_efficiency(rows: int, cols: int, inner: float, units: Optional[int], shape: GemmShape) -> float:
    """A GEMM's rate relative to the device's measured large-GEMM rate for its shape: the tile its library
    chooses (the one whose waves, at its own rate, do the most useful work) and each tile's fixed cost beside its
    inner loop, relative to the same at the shape the rate was measured at (where the shape states one). Cached:
    the planner prices the same few shapes under thousands of layouts."""
    n = shape.reference
    return _tiled(rows, cols, inner, units, shape) / (_tiled(n, n, n, units, shape) if n else 1.0)


def _tiled(rows: int, cols: int, inner: float, units: Optional[int], shape: GemmShape) -> float:
    tiles = max(rate * wave_efficiency(rows, cols, units, (tm, tn)) for tm, tn, rate in shape.tiles)
    return tiles / (1 + shape.inner_overhead / inner) if shape.inner_overhead and inner > 0 else tiles


def kernel_s(k: Kernel, rates: Rates) -> float:
    """The roofline of one kernel: its FLOPs at its class's rate or its bytes at the memory bandwidth, plus, for
    kernels other than GEMMs, the fixed device time of each launch (a short kernel's bandwidth falls as a + V/b)."""
    if k.kind == "gemm":
        compute = (k.flops + k.count * rates.gemm_half_flops) / rates.gemm_flops
        rows, cols = k.shape
        inner = k.flops / (2.0 * rows * cols * k.count) if rows > 0 and cols > 0 and k.count > 0 else 0.0
        compute /= shape_efficiency(rows, cols, inner, rates.units, rates.gemm_shape)
        startup = 0.0
    elif k.kind == "attention":
        compute, startup = k.flops / (rates.attention_flops or rates.gemm_flops), k.count * rates.startup_s
    else:
        compute, startup = 0.0, k.count * rates.startup_s
    memory = k.bytes / rates.memory_bw if rates.memory_bw else 0.0
    return max(compute, memory) + startup


def gemm(name: str, rows: int, inner: int, cols: int, E: float, count: float = 1.0) -> Kernel:
    """A GEMM (rows × inner) · (inner × cols): its FLOPs, and the bytes it reads and writes once each, which bound
    it where its inner dimension is short (attention's score GEMMs over a head's 64–128 dimensions)."""
    moved = E * (rows * inner + inner * cols + rows * cols)
    return Kernel(name, "gemm", 2.0 * rows * inner * cols * count, moved * count, count, (rows, cols))


def linear_kernels(name: str, tokens: int, n_in: int, n_out: int, passes: float, E: float) -> list[Kernel]:
    """A linear's forward GEMM (tokens × out) and, `passes` − 1 times, its backward pair: the input gradient
    (tokens × in) and the weight gradient (in × out), each as many FLOPs as the forward."""
    out = [gemm(f"{name}.fwd", tokens, n_in, n_out, E)]
    if passes > 1:
        out += [gemm(f"{name}.dgrad", tokens, n_out, n_in, E), gemm(f"{name}.wgrad", n_in, tokens, n_out, E)]
    return out


def layer_kernels(job: Job, *, backward: bool = True, region: str = "block") -> list[Kernel]:
    """One transformer layer's kernels for one micro-batch on one TP rank: forward and (with `backward`) backward,
    of the whole block or of a checkpointing region of it ("attn", "attn.core": its recompute)."""
    from harness.models.config import block_linears

    m, layout, sw = job.model, job.layout, job.software
    tp = layout.tp
    tokens = job.tokens  # this rank's chunk of the micro-batch's sequences under context parallelism
    E = job.act_bytes
    h = m.d_model
    seq_split = tp if job.sequence_parallel else 1
    heads = m.n_heads // tp
    qk = tokens * (m.n_heads + m.kv_heads) * m.head_dim / tp  # q and k elements (RoPE)
    ffn = m.ffn_width // tp
    fwd_only = not backward
    out: list[Kernel] = []

    def memory(name: str, elements: float, fwd_passes: float, bwd_passes: float, kernels: float = 1.0,
               bwd_kernels: Optional[float] = None) -> None:
        """`kernels` launches in the forward, `bwd_kernels` (else as many) in the backward, where each moves data."""
        bwd = 0.0 if fwd_only else bwd_passes
        count = kernels * (fwd_passes > 0) + (kernels if bwd_kernels is None else bwd_kernels) * (bwd > 0)
        out.append(Kernel(name, "memory", bytes=elements * (fwd_passes + bwd) * E, count=count))

    residual = tokens * h / seq_split
    in_attention = region in ("block", "attn")
    if region == "block" and not sw.compiled:
        out.append(norm_kernel("norm1", residual, job, fwd_only))
    for spec in block_linears(m):
        n_in, n_out = spec.on_rank(tp)
        attention_part = spec.name.startswith("attn.")
        if (attention_part and in_attention) or (not attention_part and region == "block"):
            out += linear_kernels(spec.name, tokens, n_in, n_out, 1 if fwd_only else 3, E)
        if spec.name == "attn.qkv" and region in ("block", "attn", "attn.core"):
            if in_attention and m.position == "rope":
                rope = 2.0 if sw.fused_rope or sw.compiled else ROPE_PASSES
                memory("rope", qk, rope, rope, kernels=1 if sw.fused_rope or sw.compiled else 5)
            out += attention_kernels(job, heads, fwd_only)
            out += qkv_layout_kernels(job, fwd_only, region) + ring_attention_kernels(job, fwd_only)
            if in_attention and (sw.attention_reshape_passes[0] or not fwd_only and sw.attention_reshape_passes[1]):
                memory("attention reshapes", tokens * h / tp, *sw.attention_reshape_passes,
                       *sw.attention_reshape_kernels)
        if spec.name == "attn.proj" and in_attention and sw.seq_first_proj_copy and layout.micro_batch_size > 1:
            memory("proj input copy", tokens * h / tp, 2.0, 4.0)
        if spec.name == "attn.proj" and region == "block":
            out += residual_kernels("residual1", residual, E, job.stream_bytes, sw, fwd_only)
            if not sw.compiled:
                out.append(norm_kernel("norm2", residual, job, fwd_only))
        if spec.name == "mlp.fc" and region == "block":
            swiglu = m.activation == "swiglu"
            fused = sw.fused_activation or sw.compiled
            fwd, bwd = ((3.0, 5.0) if fused else (5.0, 8.0)) if swiglu else (2.0, 3.0)
            if swiglu and not fused and sw.split_glu:
                bwd += 4.0  # the split's backward concatenates the gate and up gradients
            memory("activation", tokens * ffn, fwd, bwd, kernels=1 if fused or not swiglu else 2)
    if region == "block":
        out += residual_kernels("residual2", residual, E, job.stream_bytes, sw, fwd_only)
        if job.autocast:  # fp32 weights cast to the compute dtype at each use (read 4, write E bytes), and
            # each weight's gradient cast back to fp32 in the backward (autograd's _to_copy: read E, write 4)
            weights = sum(spec.n_in * spec.n_out for spec in block_linears(m)) / tp
            directions = 1 if fwd_only else 2
            out.append(Kernel("weight casts", "memory", bytes=weights * (4 + E) * directions,
                              count=len(block_linears(m)) * directions))
        if m.bias and not fwd_only and not sw.compiled:
            out.append(bias_grad_kernel(job))
    return out


def bias_grad_kernel(job: Job) -> Kernel:
    """The biases' gradients of one layer's linears: each is its output gradient summed over the tokens, a
    reduction that reads that gradient once more in its own kernel (PyTorch's addmm backward, `grad.sum(0)`,
    tools/autograd/derivatives.yaml; Megatron's linear layers likewise, `grad_output.sum(dim=0)`). torch.compile
    fuses it into the kernel that produces the gradient. A row-parallel layer's bias is added after its output is
    reduced (or reduce-scattered, with sequence parallelism), so its gradient spans the whole width."""
    from harness.models.config import block_linears

    tp, seq_split = job.layout.tp, job.layout.tp if job.sequence_parallel else 1
    elements = sum(job.tokens * spec.n_out / (tp if spec.split == "column" else seq_split)
                   for spec in block_linears(job.model))
    return Kernel("bias grads", "memory", bytes=elements * job.act_bytes, count=len(block_linears(job.model)))


def _qkv_elements(job: Job) -> tuple[float, float, float]:
    """This rank's query and key (= value) elements of one micro-batch, and its softmax statistics (one per
    token and query head)."""
    m, tp = job.model, job.layout.tp
    heads, kv = m.n_heads / tp, max(1.0, m.kv_heads / tp)
    return job.tokens * heads * m.head_dim, job.tokens * kv * m.head_dim, job.tokens * heads


def qkv_layout_kernels(job: Job, fwd_only: bool, region: str = "block") -> list[Kernel]:
    """The copies between megatron-core's fused QKV output and Transformer Engine's attention (Software.
    megatron_qkv_split; megatron/core/transformer/attention.py and extensions/transformer_engine.py at aa6207e,
    megatron-core 0.11; transformer_engine/pytorch/attention.py at 3b2a7b0, the 1.14 code NeMo d2b2155 pins). q, k
    and v are views of that output. With grouped queries and more than one KV group on the rank, `query.reshape`
    merges the groups' heads, a copy (2 passes over q). With fused RoPE (apply_rope_fusion, on in NeMo's Llama and
    Nemotron configs and by default in Megatron-LM) the attention runs in the bshd format, for which v, a strided
    view, is transposed and made contiguous (2 passes over v); the fused RoPE kernel itself is the `rope` kernel.
    In the backward Transformer Engine's SplitAlongDim concatenates dq, dk and dv, which the attention wrote apart,
    (2 passes over each), except where q, k and v stay one packed tensor (heads = KV heads and no RoPE: the
    sbh3d layout, GPT-3's): nothing is copied then. At one sequence per micro-batch, as the recipes run. A
    recompute of the core attention alone ("attn.core": selective recompute) repeats only v's copy, which
    Transformer Engine's attention makes; the merge runs before it, in get_query_key_value_tensors."""
    m, sw = job.model, job.software
    if not sw.megatron_qkv_split:
        return []
    packed = m.n_heads == m.kv_heads and m.position != "rope"
    if packed:
        return []
    q, kv, _ = _qkv_elements(job)
    merge = m.kv_heads < m.n_heads and m.kv_heads / job.layout.tp > 1 and region != "attn.core"
    fwd = 2 * q * merge + 2 * kv * (m.position == "rope")
    fwd_kernels = int(merge) + int(m.position == "rope")
    bwd = 0.0 if fwd_only else 2 * (q + 2 * kv)
    return [Kernel("qkv layout copies", "memory", bytes=(fwd + bwd) * job.act_bytes,
                   count=fwd_kernels + (0 if fwd_only else 1))]


def _te_ring(cp: int, q: float, kv: float, lse: float, E: float) -> tuple[float, float, float, float]:
    """Transformer Engine's ring context parallelism beside its attention calls (Software.ring_attention "te";
    AttnFuncWithCPAndKVP2P in transformer_engine/pytorch/attention.py at 3b2a7b0, TE 1.14 as NeMo d2b2155 pins it;
    its P2P sends are communication, priced apart). On rank r of cp, with this rank's q and k + v elements Q and KV
    (activation dtype) and L softmax statistics (fp32, one per token and head), in bytes per element:
    forward, the send buffer's K/V concatenation (2KV), a zeroed output (Q), the statistics cloned to fp64 (20L),
    corrected at each later step (20L, or 10L on half a chunk pair) and cast back (12L), the output corrected at
    each step (3Q + 8L, or 1.5Q + 6L on half): (1.5cp + 1.5r + 2.5)Q + 2KV + (16cp + 12r + 24)L in 2cp + 4 kernels;
    backward, the statistics made contiguous (4L), the K/V buffer copied (2KV), dk and dv concatenated at each step
    and dq, dk, dv accumulated step by step: (1.5cp + 1.5r + 0.5)Q + (5cp − 2.5r + 1)KV + 4L in 3cp + 3 kernels
    (rank 0: (1.5cp + 0.5)Q + (5cp + 0.5)KV in 3cp + 4; the last rank: (3cp − 1)Q + (2.5cp + 4)KV in 3cp + 2).
    (forward bytes, kernels, backward bytes, kernels), summed over the ranks."""
    fwd = bwd = fwd_kernels = bwd_kernels = 0.0
    for r in range(cp):
        fwd += ((1.5 * cp + 1.5 * r + 2.5) * q + 2 * kv) * E + (16 * cp + 12 * r + 24) * lse
        fwd_kernels += 2 * cp + 4
        if r == 0:
            dq, dkv, k = 1.5 * cp + 0.5, 5 * cp + 0.5, 3 * cp + 4
        elif r == cp - 1:
            dq, dkv, k = 3 * cp - 1, 2.5 * cp + 4, 3 * cp + 2
        else:
            dq, dkv, k = 1.5 * cp + 1.5 * r + 0.5, 5 * cp - 2.5 * r + 1, 3 * cp + 3
        bwd += (dq * q + dkv * kv) * E + 4 * lse
        bwd_kernels += k
    return fwd, fwd_kernels, bwd, bwd_kernels


def _torch_ring(cp: int, q: float, kv: float, lse: float, E: float) -> tuple[float, float, float, float]:
    """torch's ring context parallelism beside its attention calls (Software.ring_attention "torch"; torch 2.13
    distributed/tensor/experimental/_context_parallel/_attention.py, `convert_to_f32` on by default). On rank r of
    cp, in bytes per element of this rank's q (Q) and k + v (KV), steps i = 1..r covering all of q, the later ones
    half of it: forward, K and V concatenated for each send but the last (2KV each), every step's output cast to
    fp32 (E + 4) and merged into the running one (`_SDPAMerger._merge_one`: out − sigmoid(·)·(out − block_out), 32
    bytes over the step's output), a half step's merge written back into the whole (`_partial_update`'s torch.cat,
    8Q), the result cast back (4 + E); backward, fp32 gradient buffers zeroed (4(Q + KV)), K and V concatenated
    for each send but the last (2KV), each step's gradients added into fp32 ((8 + E) per element added; a half
    one then concatenated back into the whole, 8 per element of it), the K/V gradients concatenated for every
    send (8KV) and the results cast back ((4 + E)(Q + KV)); on every rank but the last the output the forward
    concatenated back is in the layout the flash backward transposes from, so each backward step copies its output
    slice contiguous (`_flash_attention_backward`'s out.contiguous(): 2E per element); the softmax statistics
    (L, fp32) merged too (56 bytes each per whole step, 28 + 8 per half one, and a contiguous copy of the half,
    4, in the backward). (forward bytes, kernels, backward bytes, kernels), summed over the ranks."""
    fwd = bwd = fwd_kernels = bwd_kernels = 0.0
    later = cp - 1
    for r in range(cp):
        full, half = r, later - r  # later steps covering all of q (i <= r), half of it (i > r)
        fwd += (later * 2 * kv * E + (E + 4) * q + full * (E + 4 + 32) * q
                + half * ((E + 4 + 32) / 2 + 8) * q + (4 + E) * q + (full * 56 + half * 36) * lse)
        fwd_kernels += later + 2 + full * 9 + half * 11
        out_copies = 0.0 if r == cp - 1 else 2 * E * q * (1 + full) + E * q * half
        bwd += (4 * (q + kv) + later * 2 * kv * E + (8 + E) * (q + kv)
                + full * (((8 + E) / 2 + 8) * kv + (8 + E) * q)
                + half * ((8 + E) * kv + ((8 + E) / 2 + 8) * q + 4 * lse)
                + cp * 8 * kv + (4 + E) * (q + kv) + out_copies)
        bwd_kernels += 3 + later + 3 + full * 5 + half * 5 + cp + 2 + (0 if r == cp - 1 else cp)
    return fwd, fwd_kernels, bwd, bwd_kernels


def ring_attention_kernels(job: Job, fwd_only: bool) -> list[Kernel]:
    """The copies, casts and merges a ring's attention makes beside its attention calls, per layer and
    micro-batch on one rank, averaged over the cp ranks, whose steps wait on each other's sends (Software.
    ring_attention: _torch_ring or _te_ring); none without ring context parallelism."""
    cp = job.layout.cp
    if not job.ring_cp:
        return []
    q, kv_one, lse = _qkv_elements(job)
    kv, E = 2 * kv_one, job.act_bytes
    if job.software.ring_attention == "te":
        fwd, fwd_kernels, bwd, bwd_kernels = _te_ring(cp, q, kv, lse, E)
    else:
        fwd, fwd_kernels, bwd, bwd_kernels = _torch_ring(cp, q, kv, lse, E)
    if fwd_only:
        bwd = bwd_kernels = 0.0
    return [Kernel("ring attention copies", "memory", bytes=(fwd + bwd) / cp, count=(fwd_kernels + bwd_kernels) / cp)]


def attention_kernels(job: Job, heads: int, fwd_only: bool) -> list[Kernel]:
    """Core attention of one micro-batch on one rank: one fused kernel at its measured rate (FlashAttention counts
    its backward as 2.5 forwards), or the math path's two batched GEMMs and the softmax between them.

    Under context parallelism each rank does 1/cp of the work: ulysses attends whole sequences with heads/cp of the
    heads; ring attends its s/cp queries to every key in cp kernels, load-balanced for the causal mask (half of all
    the work skipped overall): its own chunk pair under the mask, then unmasked half blocks, each kind at its own
    rate (timing.ring_attention_rate); the copies and merges around them are ring_attention_kernels'."""
    m, sw, cp = job.model, job.software, job.layout.cp
    E, d = job.act_bytes, m.head_dim
    ring = job.ring_cp
    if cp > 1 and not ring:
        heads = heads // cp
    q_len, kv_len = (m.seq_len // cp if ring else m.seq_len), m.seq_len
    samples = job.layout.micro_batch_size
    full = 4.0 * samples * q_len * kv_len * heads * d  # QKᵀ and ·V over the whole q × kv matrix
    if sw.fused_attention:  # a causal kernel skips the masked half (FlashAttention counts it so)
        return [Kernel("attention", "attention", full / 2 * (1.0 if fwd_only else 3.5),
                       count=(1 if fwd_only else 2) * (cp if ring else 1))]
    scores = samples * q_len * kv_len * heads  # the math path computes, masks and normalises the whole matrix
    per_element = (2 * E if sw.fused_softmax else SOFTMAX_PASSES_EAGER + 2 * E) + (2 * E + 1 if sw.dropout else 0)
    batch = samples * heads  # one (q × d)·(d × kv) and one (q × kv)·(kv × d) per sample and head
    directions = 1 if fwd_only else 2
    out = [Kernel("softmax", "memory", bytes=scores * per_element * directions,
                  count=(1 if sw.fused_softmax else 4) * directions)]
    for name, inner, cols in (("attention.qk", d, kv_len), ("attention.av", kv_len, d)):
        g = gemm(name, q_len, inner, cols, E, count=batch)
        out.append(Kernel(name, "gemm", g.flops, g.bytes, 1))  # one batched kernel: no per-matrix fill cost
        if not fwd_only:  # its two gradients, as many FLOPs and bytes each
            out.append(Kernel(name + ".bwd", "gemm", 2 * g.flops, 2 * g.bytes, 2))
    return out


def residual_kernels(name: str, elements: float, E: float, S: float, sw: Software, fwd_only: bool) -> list[Kernel]:
    """Dropout (where the software has it) and the residual add, and their backward: fused, read two and write one
    (plus the mask); eager, dropout reads and writes (and writes its mask) and the add reads two and writes one;
    backward, the add's gradient goes to both branches and autograd sums them (3 passes), dropout's through its
    mask. A stream wider than the branch (S bytes against E: fp32 under autocast) is read and written at its own
    width, and autograd casts the branch's gradient down to the branch's dtype (one more kernel)."""
    mask = 1 if sw.dropout else 0
    add = 2 * S + E  # read the stream and the branch, write the stream
    if sw.fused_bias_dropout_add or sw.compiled:  # a fused kernel writes the branch's gradient in its dtype too
        fwd, bwd, kernels, cast_kernels = add + mask, 3 * S + (E if S != E else 0) + 2 * mask * E, 1, 0
    else:
        cast = S + E if S != E else 0
        fwd, bwd, kernels = add + mask * (2 * E + 1), 3 * S + cast + mask * (2 * E + 1), 1 + mask
        cast_kernels = 1 if cast else 0
    passes = fwd + (0 if fwd_only else bwd)
    return [Kernel(name, "memory", bytes=elements * passes,
                   count=kernels + (0 if fwd_only else kernels + cast_kernels))]


def head_kernels(job: Job) -> list[Kernel]:
    """The output layer and the loss over the vocabulary (on the last stage), forward and backward."""
    m, sw = job.model, job.software
    tokens = job.tokens
    E = job.act_bytes
    columns, loss = job.vocab_per_rank
    out = linear_kernels("lm_head", tokens, m.d_model, int(columns), 3, E)
    if not (sw.compiled and sw.compile_whole_model):
        out.append(norm_kernel("norm_f", tokens * m.d_model, job))
    kind = sw.loss_kind
    if kind == "fused":
        per_element = 2 * E
    elif kind == "vocab_parallel":
        per_element = LOSS_BYTES_VOCAB_PARALLEL + 2 * E
    elif kind == "vocab_parallel_fused":
        per_element = LOSS_BYTES_VOCAB_PARALLEL_FUSED + 2 * E
    else:
        per_element = 4 * E if sw.loss_in_compute_dtype else LOSS_BYTES_EAGER + 2 * E
    out.append(Kernel("cross entropy", "memory", bytes=tokens * loss * per_element, count=LOSS_PASSES[kind]))
    out.append(Kernel("embedding", "memory", bytes=tokens * m.d_model * job.stream_bytes * 3, count=2))
    out += embedding_gradient_kernels(job)
    if job.autocast:  # the output layer's fp32 weight cast for the forward and its gradient cast back
        out.append(Kernel("head weight cast", "memory", bytes=columns * m.d_model * (4 + E) * 2, count=2))
    return out


def embedding_gradient_kernels(job: Job) -> list[Kernel]:
    """The token embedding's weight gradient is dense: PyTorch's embedding backward (`embedding_dense_backward`,
    Megatron's and nanotron's vocabulary-parallel embeddings call it too) zero-fills a vocabulary × hidden gradient
    of the weight's dtype each micro-batch and adds the tokens' rows into it. A tied output layer's gradient for the
    same tensor is then summed with it by autograd (two reads and a write), where both sit on one stage."""
    m = job.model
    W = 4 if job.autocast else job.act_bytes  # fp32 weights under autocast, else the compute dtype's
    gradient = job.embedding_rows * m.d_model * W
    out = [Kernel("embedding gradient fill", "memory", bytes=gradient, count=1)]
    if m.tie_embeddings and job.layout.pp == 1:
        out.append(Kernel("tied embedding gradient sum", "memory", bytes=gradient * 3, count=1))
    return out


def recompute_kernels(job: Job) -> list[Kernel]:
    """What activation checkpointing runs again in one layer's backward, weighted by the share of layers under
    each mode (every n-th block, say): the region's forward, less its last GEMM where PyTorch's checkpoint stops
    early (software.recompute_early_stop)."""
    out: list[Kernel] = []
    for mode, share in job.checkpoint_modes.items():
        region = CHECKPOINTING[mode].region
        if not region or share == 0:
            continue
        kernels = layer_kernels(job, backward=False, region=region)
        if job.software.recompute_early_stop:
            gemms = [k for k in kernels if k.kind == "gemm"]
            if gemms:
                kernels.remove(gemms[-1])
        out += [Kernel(k.name + " (recompute)", k.kind, k.flops * share, k.bytes * share, k.count * share, k.shape)
                for k in kernels]
    return out


def optimizer_kernel(params: float, tensors: int, implementation: str, value_bytes: float = 4.0) -> Kernel:
    """AdamW over `params` parameters (`tensors` tensors) on this rank: memory-bound; its weights, gradients and
    moments `value_bytes` each (fp32, or 16-bit where the software keeps its states in the compute dtype)."""
    return Kernel("optimizer", "memory", bytes=params * OPTIMIZER_BYTES[implementation] * value_bytes / 4,
                  count=tensors * OPTIMIZER_KERNELS_PER_TENSOR[implementation] + 6)


def kernels_s(kernels: list[Kernel], rates: Rates, *, overlap_host: bool) -> float:
    """Time of a list of kernels: on a GPU the device's time, unless launching them takes the host longer; on a
    CPU the two add up."""
    device = sum(kernel_s(k, rates) for k in kernels)
    host = rates.launch_s * sum(k.count for k in kernels)
    return max(device, host) if overlap_host else device + host


