"""Step time, energy, figure of merit and projections.

Step time = compute + exposed communication, stretched by the pipeline bubble:
- compute: one block's kernels as the software launches them (kernels.py), each a roofline of its FLOPs at
  its class's measured rate (a large GEMM's, slowed by its size and by tile and wave quantization; the fused
  attention kernel's) and its bytes at the measured streaming bandwidth, plus the host time that launching
  them takes where it is longer than the kernels (a GPU) or on top of them (a CPU, whose calibrated overheads
  per block and per step hold it); the output layer with its loss; the optimizer as its implementation runs;
- communication: per collective, as NCCL/RCCL run it over the node's fabric and its NICs (network.py);
  what of it overlaps compute is the software's mechanism (software.py) and needs a system that
  computes while it communicates (`overlap_comm`; not a CPU): DP gathers and reductions under the
  compute windows they are issued in, TP only with TP/GEMM pipelining, pipeline sends only where the
  schedule overlaps them.
- pipeline: 1F1B runs m micro-batches in (m + (p−1)/v) micro-batch times, a bubble of (p−1)/(v·m)
  (Narayanan et al. 2021, section 2.2); every schedule's by its registry entry (core.registry).
Energy is device power × time, the power rising linearly from idle to peak with the busy fraction.
The ALCF-4 figure of merit is (6·s·d² + s²·d)·b·L / T_step. A full training run needs model FLOPs
per token × D tokens, by default D = 20·P (Hoffmann et al. 2022), t ≈ T_FLOPs / R_FLOPs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Optional

from harness.core.registry import CHECKPOINTING, PP_SCHEDULES, pipeline_bubble
from harness.costmodel.comm import DIMS, Collective, per_node, tp_regathers
from harness.costmodel.flops import model_key, param_tensors
from harness.costmodel.kernels import (
    Kernel,
    Rates,
    head_kernels,
    kernel_s,
    kernels_s,
    layer_kernels,
    linear_kernels,
    optimizer_kernel,
    recompute_kernels,
    shape_efficiency,
)
from harness.costmodel.layout import Job, layers_per_stage, param_split, stage_loads
from harness.costmodel.network import Fabric, fabric
from harness.costmodel.peaks import (
    AttentionTable,
    GemmShape,
    attention_rate,
    device_entry,
    gemm_efficiency,
    gemm_precision_ratios,
    gemm_shape,
    kernel_startup_us,
    match_device,
    memory_efficiency,
)

TENSOR_CORE_PRECISIONS = ("bf16", "fp16")
"""The 16-bit dtypes that run on the tensor cores at one peak: the fused attention kernels' and a SustainedGemm's."""


@dataclass(frozen=True)
class Hardware:
    """The system profile's numbers, in base units."""

    peak_flops: float
    gemm_efficiency: float
    gemm_half_flops: float
    memory_bw: Optional[float]
    """What a memory-bound kernel moves per second: the datasheet bandwidth × its measured streaming efficiency."""
    fabric: Fabric
    overlap_comm: bool
    layer_overhead_s: float
    step_overhead_s: float
    idle_power_w: Optional[float]
    peak_power_w: Optional[float]
    compute_units: Optional[int] = None
    """SMs/CUs a GEMM's output tiles fill in waves (peaks.py); None: no wave quantization (a CPU)."""
    attention: AttentionTable = ()
    """The device's measured fused-attention rates (peaks.py)."""
    cudnn_attention: AttentionTable = ()
    """cuDNN's, where measured (peaks.DevicePeak.cudnn_attention)."""
    launch_s: float = 0.0
    accelerator: bool = True
    """Kernels run asynchronously to the host that launches them (a GPU), so host time hides behind them."""
    attention_flops: Optional[float] = None
    """A measured fused-attention rate (`harness calibrate --from`), before the device's published table."""
    overlap_slowdown: float = 0.0
    """Compute's slowdown while a collective overlaps it (OVERLAP_SLOWDOWN)."""
    gemm_precision_ratio: tuple[tuple[str, float], ...] = ()
    """A GEMM's rate in each dtype the device's entry names, relative to gemm_efficiency's (peaks.py)."""
    startup_s: float = 0.0
    """Device time per memory-bound or attention kernel beyond its work (peaks.kernel_startup_us)."""
    gemm_shape: GemmShape = GemmShape()
    """The tiles the device's GEMM library chooses among and its inner-dimension cost (peaks.GemmShape)."""
    sustained_share: float = 1.0
    """The share of its short-benchmark 16-bit GEMM rate the device holds under continuous load (sustained_share)."""

    def rates(self, job: Job) -> Rates:
        """The achievable rate of each kernel class for this job's shapes (kernels.Rates)."""
        m = job.model
        attention = self.attention_flops if job.software.fused_attention else None
        if attention is None and job.precision in TENSOR_CORE_PRECISIONS and job.software.fused_attention:
            sw = job.software
            cudnn = sw.attention_kernel == "cudnn" and cudnn_serves(m.head_dim, sw.cudnn_head_dim_max)
            table = self.cudnn_attention if cudnn else ()
            tflops = ring_attention_rate(table or self.attention, m.head_dim, m.seq_len, job.layout.cp) \
                if job.ring_cp else attention_rate(table or self.attention, m.head_dim, True, m.seq_len)
            attention = None if tflops is None else tflops * 1e12
        held = self.sustained_share if job.precision in TENSOR_CORE_PRECISIONS else 1.0
        gemm = self.peak_flops * self.gemm_efficiency * held * dict(self.gemm_precision_ratio).get(job.precision, 1.0)
        return Rates(gemm_flops=gemm, gemm_half_flops=self.gemm_half_flops,
                     memory_bw=self.memory_bw, attention_flops=attention, launch_s=self.launch_s,
                     units=self.compute_units, startup_s=self.startup_s, gemm_shape=self.gemm_shape)


def cpu_share(system: Any, local_ranks: Optional[int]) -> tuple[float, float]:
    """(compute, host) speed of one rank on a CPU host running `local_ranks` ranks, relative to when the profile
    was measured: each rank computes on the cores it gets (floor(cores/ranks) threads, less than one core when
    the ranks outnumber the cores) and runs its Python on at most one; (1, 1) where the profile does not say."""
    cores, measured = getattr(system, "cores_per_node", None), getattr(system, "calibrated_ranks_per_node", None)
    if getattr(system, "device", None) != "cpu" or not cores or not measured or not local_ranks:
        return 1.0, 1.0

    def compute(ranks: int) -> float:
        return min(max(1, cores // ranks), cores / ranks)

    def host(ranks: int) -> float:
        return min(1.0, cores / ranks)

    return compute(local_ranks) / compute(measured), host(local_ranks) / host(measured)


OVERLAP_SLOWDOWN = 0.189
"""Compute runs this much slower while a collective overlaps it: NCCL's and RCCL's kernels hold SMs/CUs (one per
channel) and memory bandwidth, so a GEMM's tiles run in more waves. 18.9% is the average over GPT and Llama layers
with concurrent collectives on 4 A100, H100, MI250 and MI210 (maximum 40%) in "Characterizing Compute-Communication
Overlap in GPU-Accelerated Distributed Deep Learning: Performance and Power Implications", arXiv 2507.03114, a
microbenchmark study, not a training table; `system.overlap_slowdown` gives a site's own figure."""

GPU_KERNEL_LAUNCH_US = 5.0
"""Host time per kernel of eager PyTorch on a GPU host where no profile measured it: the Python call, the
dispatcher, autograd's bookkeeping and cudaLaunchKernel, each a few microseconds (`harness calibrate` measures
the host's own per block)."""


def cudnn_serves(head_dim: int, widest: int = 128) -> bool:
    """Whether the attention dispatcher gives this head dimension to cuDNN's kernel: up to `widest`
    (Software.cudnn_head_dim_max: PyTorch SDPA's 128, Transformer Engine's 256 on Hopper), a multiple of 8
    (`check_cudnn_tensor_shapes` in aten/src/ATen/native/transformers/cuda/sdp_utils.cpp); otherwise
    FlashAttention-2 runs."""
    return head_dim <= widest and head_dim % 8 == 0


def ring_attention_rate(table: AttentionTable, head_dim: int, seq_len: int, cp: int) -> Optional[float]:
    """A load-balanced ring's fused-attention rate on one rank, forward + backward. Each sequence is cut in 2·cp
    chunks and rank r holds chunks r and 2·cp−1−r, so of its cp steps the first attends its own queries to its own
    keys under the causal mask (s/cp × s/cp, half of it computed: 1/cp of the rank's work) and each other step is an
    unmasked block of half the queries or half the keys (s/cp × s/(2·cp)): torch's `_templated_ring_attention`
    (torch 2.13 distributed/tensor/experimental/_context_parallel/_attention.py: i == 0 causal, else
    query.chunk(2)[1] or key.chunk(2)[0], is_causal False) and Transformer Engine's AttnFuncWithCPAndKVP2P
    (transformer_engine/pytorch/attention.py at 3b2a7b0, the 1.14 code NeMo d2b2155 pins: the diagonal step with
    the causal mask, the others with none on half-size blocks). Each kind at its measured rate, the unmasked
    blocks at the length of the square of the same work (s/cp/√2); the rank's rate is the work over the summed
    times. None where the device has no measurement."""
    block = seq_len // cp
    diagonal = attention_rate(table, head_dim, True, block)
    halves = attention_rate(table, head_dim, False, int(block / math.sqrt(2)))
    if diagonal is None or halves is None:
        return None
    return 1.0 / ((1.0 / cp) / diagonal + ((cp - 1.0) / cp) / halves)


def sustained_share(system: Any) -> float:
    """The share of its 16-bit GEMM rate a device holds through a training step, which keeps it under continuous
    load at its power limit: its measured rate there (peaks.SustainedGemm) over what the rates behind
    gemm_efficiency and gemm_shape give the same GEMM, at most 1 (a device that holds more is not raised: its other
    figures stand); 1 where the profile states its own peak or efficiency (`harness calibrate`, a site's figure:
    taken as stated), or the device has no such measurement."""
    stated = getattr(system, "gemm_efficiency", None) is not None or getattr(system, "peak_tflops", None) is not None
    if stated or getattr(system, "device", "") == "cpu":
        return 1.0
    return _device_sustained_share(getattr(system, "accelerator", None) or "")


@functools.lru_cache(maxsize=64)
def _device_sustained_share(accelerator: str) -> float:
    """Cached on the name, all it depends on: the planner builds a Hardware for every layout it prices."""
    entry = match_device(accelerator)
    held = None if entry is None else entry.sustained_gemm
    peak = None if held is None else entry.tflops.get(held.precision)
    if held is None or not peak or entry.gemm_efficiency is None:
        return 1.0
    n = held.size
    rate = peak * entry.gemm_efficiency * entry.gemm_precision_ratio.get(held.precision, 1.0)
    return min(1.0, held.tflops / (rate * shape_efficiency(n, n, n, entry.compute_units, entry.gemm_shape)))


def hardware(system: Any, peak_tflops: float, local_ranks: Optional[int] = None) -> Hardware:
    """The profile's numbers for a job with `local_ranks` ranks per node (a CPU host's ranks share its cores)."""
    gbps = lambda v: None if v is None else v * 1e9  # noqa: E731
    entry = device_entry(system)
    on_cpu = getattr(system, "device", "cuda") == "cpu"
    launch = getattr(system, "kernel_launch_us", None)
    hbm = gbps(system.hbm_bw_gb_per_s)
    speed, host = cpu_share(system, local_ranks)
    attention = getattr(system, "attention_tflops", None)
    slowdown = getattr(system, "overlap_slowdown", None)
    return Hardware(
        peak_flops=peak_tflops * 1e12 * speed,
        gemm_efficiency=gemm_efficiency(system),
        gemm_half_flops=system.gemm_half_gflop * 1e9,
        memory_bw=None if hbm is None else hbm * memory_efficiency(system) * speed,
        fabric=fabric(system),
        overlap_comm=getattr(system, "overlap_comm", True),
        layer_overhead_s=system.layer_overhead_us * 1e-6 / host,
        step_overhead_s=system.step_overhead_us * 1e-6 / host,
        idle_power_w=system.idle_power_w,
        peak_power_w=system.peak_power_w,
        compute_units=getattr(entry, "compute_units", None),
        attention=getattr(entry, "attention", ()) or (),
        cudnn_attention=getattr(entry, "cudnn_attention", ()) or (),
        launch_s=(launch if launch is not None else 0.0 if on_cpu else GPU_KERNEL_LAUNCH_US) * 1e-6 / host,
        accelerator=not on_cpu,
        attention_flops=None if attention is None else attention * 1e12 * speed,
        overlap_slowdown=0.0 if on_cpu else OVERLAP_SLOWDOWN if slowdown is None else slowdown,
        gemm_precision_ratio=gemm_precision_ratios(system),
        startup_s=kernel_startup_us(system) * 1e-6,
        gemm_shape=gemm_shape(system),
        sustained_share=sustained_share(system),
    )


def micro_batch_compute_s(job: Job, hw: Hardware) -> float:
    """Forward + backward (+ recompute) of one micro-batch on one rank of the busiest stage."""
    return _micro_batch(job, hw)[0]


def forward_share(job: Job, hw: Hardware) -> float:
    """The forward's share of a block's compute in one micro-batch (the rest: the backward and its recompute)."""
    return _micro_batch(job, hw)[1]


def _micro_batch(job: Job, hw: Hardware) -> tuple[float, float]:
    layout = job.layout
    # What it depends on, as a key: the planner asks for the same compute under many DP layouts. Context
    # parallelism cuts each rank's tokens (Job.tokens) and how its attention runs.
    key = (model_key(job.model), layout.tp, layout.pp, job.vpp, job.pp_schedule, layout.cp, job.cp_kind,
           layout.micro_batch_size,
           job.checkpointing, job.checkpoint_every_n, job.sequence_parallel, job.software, job.precision, job.device,
           hw)
    value = _COMPUTE.get(key)
    if value is None:
        if len(_COMPUTE) >= 100_000:
            _COMPUTE.clear()
        value = _COMPUTE[key] = _compute_s(job, hw)
    return value


_COMPUTE: dict[tuple[Any, ...], tuple[float, float]] = {}


def compute_kernels(job: Job) -> tuple[list[Kernel], list[Kernel]]:
    """One block's kernels (with what it recomputes) and the output layer's, for one micro-batch (kernels.py)."""
    return layer_kernels(job) + recompute_kernels(job), head_kernels(job)


def _layer_and_head_s(job: Job, hw: Hardware, rates: Rates) -> tuple[float, float]:
    """One block's compute per micro-batch (with its recompute and overhead) and the output layer's."""
    block, head = compute_kernels(job)
    return (kernels_s(block, rates, overlap_host=hw.accelerator) + hw.layer_overhead_s,
            kernels_s(head, rates, overlap_host=hw.accelerator))


def _busiest(job: Job, per_layer: float, head_s: float) -> tuple[int, bool]:
    return max(stage_loads(job), key=lambda load: load[0] * per_layer + load[1] * head_s)


def busiest_stage(job: Job, hw: Hardware) -> tuple[int, bool]:
    """(blocks, holds the output layer) of the pipeline rank whose micro-batch takes longest: the one the step's
    compute is priced on (stage_loads)."""
    return _busiest(job, *_layer_and_head_s(job, hw, hw.rates(job)))


def _compute_s(job: Job, hw: Hardware) -> tuple[float, float]:
    rates = hw.rates(job)
    per_layer, head_s = _layer_and_head_s(job, hw, rates)
    forward = kernels_s(layer_kernels(job, backward=False), rates, overlap_host=hw.accelerator)
    blocks, last = _busiest(job, per_layer, head_s)
    total = blocks * per_layer + head_s * last + hw.step_overhead_s
    return total, min(1.0, forward / per_layer) if per_layer > 0 else 1 / 3


def optimizer_s(job: Job, hw: Hardware) -> float:
    """AdamW over this rank's share of the parameters, as the software's implementation runs it (kernels.py)."""
    if hw.memory_bw is None:
        return 0.0
    params = job.params_per_rank / job.shards.optimizer
    tensors = -(-len(param_tensors(job.model)) // job.layout.pp)
    value = job.state_bytes.weights if job.software.states_in_compute_dtype else 4.0  # else fp32 (master) states
    kernel = optimizer_kernel(params, tensors, job.software.optimizer, value)
    return kernels_s([kernel], hw.rates(job), overlap_host=hw.accelerator)


def grad_accumulation_s(job: Job, hw: Hardware) -> float:
    """Adding each micro-batch's weight gradients into the step's: per addition a memory-bound pass that reads
    the sum and the new gradient and writes the sum, over the gradients this rank accumulates (its partition
    under ZeRO-2/3, which reduce every micro-batch), unless the software fuses it into the GEMM; and PyTorch DDP's
    copies of the synchronised micro-batch's gradients into its buckets and back (ddp_bucket_copies_s)."""
    if hw.memory_bw is None:
        return 0.0
    return ddp_bucket_copies_s(job, hw) + (0.0 if job.software.grad_accumulation_fusion else _accumulation_s(job, hw))


def ddp_bucket_copies_s(job: Job, hw: Hardware) -> float:
    """PyTorch DDP without gradient_as_bucket_view (its default, and Fabric's DDPStrategy's) copies each gradient
    into its bucket as the backward produces it (Reducer::mark_variable_ready_dense) and, once the bucket's
    all-reduce is done, back into .grad (finalize_bucket_dense, copy_bucket_to_grad): two passes that read and
    write the gradients, in the micro-batch that synchronises."""
    if not job.ddp_buckets or hw.memory_bw is None:
        return 0.0
    return job.params_per_rank * 4 * job.state_bytes.grads / hw.memory_bw


def _accumulation_s(job: Job, hw: Hardware) -> float:
    software, m = job.software, job.micro_batches
    every = job.fsdp_reduces_every_micro_batch  # the reduced shards accumulate, not whole gradients
    partitioned = (job.spec.deepspeed_engine and job.layout.zero_stage >= 2) or every
    params = job.params_per_rank / (job.shards.grads if partitioned else 1)
    if software.main_grad_bytes:  # the new gradient comes in the compute dtype
        return m * params * (2 * software.main_grad_bytes + job.act_bytes) / hw.memory_bw
    reduce = job.unsharded_grad_bytes
    if reduce is not None:
        # the first micro-batch's gradient is cast up to the reduce dtype, each later one added into it (torch
        # FSDPParam.to_accumulated_grad_if_needed, accumulate_unsharded_grad_if_needed)
        E = job.act_bytes
        first = E + reduce if E != reduce else 0.0
        return params * (first + (m - 1) * (2 * reduce + E)) / hw.memory_bw
    W = job.state_bytes.grads
    # each micro-batch's reduced shard is cast to the parameters' dtype before it is added (_fsdp_collectives.py
    # foreach_reduce, _to_dtype_if_needed)
    cast = m * params * (job.reduce_bytes + W) if every and job.reduce_bytes != W else 0.0
    return ((m - 1) * params * 3 * W + cast) / hw.memory_bw


def collective_s(c: Collective, hw: Hardware) -> Optional[float]:
    """All calls of a collective over the system's fabric (network.py), each as its `units` collectives; a
    one-rank group (DeepSpeed's dp=1 reduction) moves nothing."""
    one = hw.fabric.call_s(c.kind, c.payload_bytes / c.units, c.group, c.local, c.stride)
    return None if one is None else c.calls * c.units * one


@dataclass(frozen=True)
class StepTime:
    step_s: float
    compute_s: float
    """Compute of all micro-batches on the busiest rank, without the bubble."""
    bubble_fraction: float
    exposed_comm_s: dict[str, float]
    """Communication on the critical path, by dimension."""
    comm_s: dict[str, float]
    """All communication time, overlapped or not, by dimension."""
    memory_bound_s: dict[str, float]
    """Outside the micro-batches: the optimizer step and the gradient accumulation passes; and `contention`, the
    compute that overlapped communication slowed (OVERLAP_SLOWDOWN)."""


def exposed_dp_s(timed: list[tuple[Collective, float]], job: Job, per_mb: float, hw: Hardware,
                 tp_s: float = 0.0) -> float:
    """Data-parallel time on the critical path, micro-batch by micro-batch and phase by phase.

    A collective runs in the phase that issues it, beside that phase's compute and its blocking TP communication
    (`tp_s` per step, split like the compute): FSDP gathers a block's parameters for its forward and, resharded,
    again for its backward (prefetched one block ahead either way); ZeRO-3's gathers spread over the micro-batch;
    gradient reductions run in the backward of the micro-batch that issues them (all, or the last), if the
    software reduces in buckets as gradients become ready; a distributed optimizer's once-per-step parameter
    gather runs during the first forward only where the software says so. What a phase's compute cannot cover is
    exposed: one phase's slack does not cover another's load, since a collective cannot start before it is issued.
    FSDP's pipeline of gathers has ends that nothing covers (sharded_edge_share): each micro-batch's first gathers
    wait for what is queued before them (the optimizer's update of the shards, then the previous backward), and
    the step's last reduce-scatters hold up the optimizer (each micro-batch's, where FSDP reduces in every one).
    """
    if not hw.overlap_comm:
        return sum(t for _, t in timed)
    m = job.micro_batches
    share = forward_share(job, hw)
    busy = per_mb + tp_s / m
    forward_window, backward_window = busy * share, busy * (1 - share)
    edge = sharded_edge_share(job)
    forward = backward = first = last = exposed = 0.0  # per-micro-batch loads; what no phase covers
    for c, t in timed:
        every = c.calls >= m and c.calls % m == 0
        if c.role == "grads" and (c.calls == 1 or every) and edge:
            # the first block's and the root's reduce-scatters, after the last backward; where FSDP reduces in every
            # micro-batch, after each: its post-backward callback makes the compute stream wait for them whenever
            # is_last_backward holds, which it does unless the loop clears it (torch 2.13 _fsdp_state.py
            # _root_post_backward_final_callback, `is_last_backward` True by default)
            drain = t * edge  # all of it: one call, or (FSDP) every micro-batch's
            exposed, t = exposed + drain, t - drain
        if c.role == "params":
            if job.spec.shardings:
                # FSDP2's root pre-forward makes the gather streams wait for everything queued (torch
                # _fsdp_state._root_pre_forward: the optimizer's update at a step's first forward, the previous
                # backward after it, as each root forward ends the iteration): every forward's first gathers
                per_call = t / c.calls
                fill = per_call * edge
                if c.calls >= 2 * m:  # resharded after each forward: gathered for the forward and the backward
                    # a root resharded after its forward is gathered again by its pre-backward hook, which fires
                    # when the loss's backward has produced the logits' gradient: the output layer's backward
                    # waits for it, and only then is the last block's gather prefetched (_fsdp_state._pre_backward)
                    root = per_call * root_share(job)
                    exposed += (fill + root) * m
                    forward += per_call - fill
                    backward += per_call * (c.calls // m - 1) - root
                else:  # kept gathered between uses (Job.fsdp_gathers): about once per micro-batch, or per step
                    firsts = min(m, c.calls)
                    exposed += fill * firsts
                    forward += (t - fill * firsts) / m
            elif not every and job.software.param_gather_overlap:
                first += t
            elif not every:
                exposed += t
            else:
                forward += t / m * share
                backward += t / m * (1 - share)
        elif not job.grad_reduce_overlap:
            exposed += t
        elif every:
            backward += t / m
        else:
            last += t

    def over(load: float, window: float) -> float:
        return max(0.0, load - window)

    return (exposed + over(forward + first, forward_window) + (m - 1) * over(forward, forward_window)
            + (m - 1) * over(backward, backward_window) + over(backward + last, backward_window))


DDP_BUCKET_BYTES = 25 * 2**20
"""PyTorch DDP's bucket_cap_mb (25, its default and Fabric's): a bucket closes once it holds this much."""


def sharded_edge_share(job: Job) -> float:
    """The share of an FSDP gather or reduce-scatter that no compute can cover: the root module's parameters (the
    embedding, final norm and output layer, which the last `fully_shard` of the model holds) and the first
    block's. The root's gather, then block 0's, must finish before the embedding and block 0 run, with nothing
    issued before them (block 1's gather is the first to hide, under block 0); in the backward block 0 and the
    embedding are the last to produce gradients, so their reduce-scatters run after all compute. PyTorch DDP's
    last bucket holds the input embedding's gradient (a tensor is never split over buckets), ready only when the
    backward ends, beside what block 0 produced since the previous bucket closed at DDP_BUCKET_BYTES: its
    all-reduce runs after all compute. 0 without sharded parameters or buckets."""
    if job.ddp_buckets and job.params_per_rank > 0:  # DDP: no TP, no pipeline
        # beside the embedding, on average half a bucket of block 0's gradients, ready just before it
        tail = param_split(job.model).embedding + DDP_BUCKET_BYTES / 2 / job.state_bytes.grads
        return min(1.0, tail / job.params_per_rank)
    if not job.spec.shardings or job.shards.weights <= 1 or job.sharding == "no_shard":
        return 0.0
    return min(1.0, root_share(job) + job.block_params_per_rank / job.params_per_rank)


def root_share(job: Job) -> float:
    """The share of an FSDP gather that is the root module's own parameters (the embedding, final norm and output
    layer on the rank that holds the most)."""
    return job.root_params_per_rank / job.params_per_rank if job.params_per_rank > 0 else 0.0


def fsdp_copies_s(job: Job, hw: Hardware) -> float:
    """FSDP2's copies on the compute stream: after each all-gather, `foreach_all_gather_copy_out` copies the
    gathered buffer into the unit's parameters (run by `wait_for_unshard` on the current stream; at world size 1,
    after casting the shard to the compute dtype there), and before the reduce-scatter `foreach_reduce` copies the
    unsharded gradients into its input (`foreach_reduce_scatter_copy_in`, also on the current stream, in the reduce
    dtype): each a read and a write of the unit's parameters (torch 2.13 distributed/fsdp/_fully_shard/
    _fsdp_param_group.py, _fsdp_collectives.py), as many gathers as Job.fsdp_gathers counts and one reduction per
    step, or per micro-batch (Job.fsdp_reduces_every_micro_batch) (fsdp_copy_kernels)."""
    if hw.memory_bw is None:
        return 0.0
    return kernels_s(fsdp_copy_kernels(job), hw.rates(job), overlap_host=hw.accelerator)


def fsdp_copy_kernels(job: Job) -> list[Kernel]:
    """fsdp_copies_s's kernels, per step: none where FSDP does not wrap the model."""
    if not job.fsdp_wraps:
        return []
    gathers = job.fsdp_gathers
    units, params, E, R = job.fsdp_units, job.params_per_rank, job.act_bytes, job.reduce_bytes
    # on a one-rank group the cast of the sharded parameters to the compute dtype runs there too (the gather's
    # input), before the copy; on more ranks it is a 1/n shard's, on the gather's copy-in stream
    W = job.state_bytes.weights
    out = 2 * E + (W + E if job.shards.weights == 1 and W != E else 0)
    # the reduce-scatter's input is cast from the compute dtype after one micro-batch (or in every one, where each
    # is reduced), copied from the gradients accumulated in the reduce dtype after several
    # (FSDPParam.to_accumulated_grad_if_needed)
    every = job.fsdp_reduces_every_micro_batch
    reductions = job.micro_batches if every else 1
    into = (E if job.micro_batches == 1 or every else R) + R
    return [Kernel("fsdp all-gather copy-out", "memory", bytes=gathers * params * out, count=gathers * units),
            Kernel("fsdp reduce-scatter copy-in", "memory", bytes=reductions * params * into,
                   count=reductions * units)]


def exposed_cp_s(timed: list[tuple[Collective, float]], job: Job, hw: Hardware) -> float:
    """Context-parallel time on the critical path: ulysses's all-to-alls all of it (the attention waits for their
    result); ring attention, per layer and micro-batch, what the attention each piece runs beside does not cover:
    a K/V all-gather only the first (diagonal) block's attention, 1/cp of the pass's, as the next block waits for
    it; each of the cp gradient shifts the next block's backward, and the last one nothing (torch waits for it
    after the loop)."""
    total = sum((t for _, t in timed), 0.0)
    if job.cp_kind != "ring" or not hw.overlap_comm or total == 0:
        return total
    rates, cp = hw.rates(job), job.layout.cp
    forward = kernels_s([k for k in layer_kernels(job, backward=False) if k.kind == "attention"], rates,
                        overlap_host=hw.accelerator)
    backward = kernels_s([k for k in layer_kernels(job) if k.kind == "attention"], rates,
                         overlap_host=hw.accelerator) - forward
    passes = layers_per_stage(job) * job.micro_batches
    exposed = 0.0
    for c, t in timed:
        each = t / c.calls if c.calls else 0.0
        if c.kind == "all_gather":  # forward, backward and recompute gathers: the forward's and recompute's beside
            share_backward = passes / c.calls  # one of each pass's gathers is the backward's
            exposed += c.calls * ((1 - share_backward) * max(0.0, each - forward / cp)
                                  + share_backward * max(0.0, each - backward / cp))
        else:  # cp gradient shifts per pass, each beside the next block's backward but the last
            exposed += passes * ((cp - 1) * max(0.0, each - backward / cp) + each)
    return exposed


def tp_hidden_s(job: Job, hw: Hardware) -> float:
    """TP time per step that runs beside the linears' own GEMMs on the busiest rank (Software.tp_backward_overlap,
    tp_shard_overlap): per column-parallel linear (each sub-layer's, and a split output layer's once per
    micro-batch) of each collective issued ahead of a GEMM, as much as that GEMM lasts; what outlasts it stays
    exposed. Its backward hides the input's re-gather (tp_regather_input) behind the input-gradient GEMM and the
    input gradient's reduce-scatter (or all-reduce) behind the weight-gradient GEMM, which waits for the gather, so
    the two follow each other on the collectives' stream; not under a zero-bubble schedule, which defers the
    weight gradient. nanotron's forward hides the input's gather behind the rank's own 1/TP chunk of the GEMM, in
    each forward pass (the recomputed one too), and a row-parallel linear's backward its output gradient's gather
    behind its own chunk of the input-gradient GEMM; it runs them only with sequence parallelism (its ALL_REDUCE
    mode refuses async communication: nanotron nn.py), so without it nothing hides."""
    from harness.models.config import block_linears

    sw, layout, m = job.software, job.layout, job.model
    t, sp = layout.tp, job.sequence_parallel
    if t == 1 or sw.tp_gather_per_projection or not (sw.tp_backward_overlap or sw.tp_shard_overlap) \
            or (sw.tp_shard_overlap and not sp):
        return 0.0
    payload = job.tokens * m.d_model * job.act_bytes
    local = per_node(1, t, job)
    gather = hw.fabric.call_s("all_gather", payload, t, local)
    reduce = hw.fabric.call_s("reduce_scatter" if sp else "all_reduce", payload, t, local)
    if gather is None or reduce is None:
        return 0.0
    rates = hw.rates(job)
    region = CHECKPOINTING[job.checkpointing].region
    wgrad_beside = sw.tp_backward_overlap and not PP_SCHEDULES[job.pp_schedule].split_backward
    regather_beside = sw.tp_backward_overlap and tp_regathers(job) > 0

    def gemms(name: str, n_in: int, n_out: int) -> tuple[float, float, float]:
        """(forward, input-gradient, weight-gradient) GEMM times of one linear on this rank."""
        fwd, dgrad, wgrad = linear_kernels(name, job.tokens, n_in, n_out, 3, job.act_bytes)
        return kernel_s(fwd, rates), kernel_s(dgrad, rates), kernel_s(wgrad, rates)

    def beside(column: tuple[float, float, float], row_dgrad: float, passes: int) -> float:
        """What one sub-layer's collectives hide behind its column-parallel GEMMs (and its row-parallel one)."""
        fwd, dgrad, wgrad = column
        hidden = min(reduce, wgrad) if wgrad_beside else 0.0
        if regather_beside:
            hidden += min(gather, dgrad)
        if sw.tp_shard_overlap:
            hidden += passes * min(gather, fwd / t) + min(gather, row_dgrad / t)
        return hidden

    per_block = 0.0
    for sub in ("attn.", "mlp."):
        specs = [spec for spec in block_linears(m) if spec.name.startswith(sub)]
        times = [(spec.split, gemms(spec.name, *spec.on_rank(t))) for spec in specs]
        fwd, dgrad, wgrad = (sum(g[i] for split, g in times if split == "column") for i in range(3))
        row_dgrad = sum(g[1] for split, g in times if split == "row")
        passes = 2 if region == "block" or (region == "attn" and sub == "attn.") else 1
        per_block += beside((fwd, dgrad, wgrad), row_dgrad, passes)
    head = 0.0
    if job.vocab.head_split:  # the output layer is column-parallel; its input gathered as a sub-layer's is
        head = beside(gemms("lm_head", m.d_model, int(job.vocab_per_rank[0])), 0.0, 1)
    return (per_block * layers_per_stage(job) + head) * job.micro_batches


def step_time(job: Job, colls: list[Collective], hw: Hardware) -> StepTime | str:
    """The modelled step, or the reason it cannot be modelled (a link bandwidth the profile lacks).

    TP traffic is on the critical path unless the software pipelines it with its GEMMs (then one of TP chunks
    stays exposed, or what the compute cannot cover). Pipeline sends are blocking unless the software overlaps
    them; then only the fill and drain transfers, 2(p·v − 1) of them, are on the critical path.
    """
    comm = dict.fromkeys(DIMS, 0.0)
    dp: list[tuple[Collective, float]] = []
    context: list[tuple[Collective, float]] = []
    p2p = tied = 0.0
    for c in colls:
        t = collective_s(c, hw)
        if t is None:
            link = "intra_node_bw_gb_per_s" if c.intra_node else "nics_per_node and nic_bw_gb_per_s"
            return f"the system profile has no {link} for the {c.dim} {c.kind}"
        comm[c.dim] += t
        if c.dim == "dp":
            dp.append((c, t))
        elif c.dim == "cp":
            context.append((c, t))
        elif c.role == "p2p":
            p2p += t
        elif c.dim == "pp":
            tied += t
    m, layout = job.micro_batches, job.layout
    per_mb = micro_batch_compute_s(job, hw)
    bubble = pipeline_bubble(job.pp_schedule, layout.pp, job.vpp, m)
    overlap = hw.overlap_comm
    tp = comm["tp"]
    if overlap and job.software.tp_comm_overlap and layout.tp > 1 and job.sequence_parallel:
        tp = max(tp / layout.tp, tp - per_mb * m)
    elif overlap:
        tp = max(0.0, tp - tp_hidden_s(job, hw))
    sends = [c.calls for c in colls if c.kind == "send_recv" and c.dim == "pp"]
    if overlap and job.software.p2p_overlap and job.vpp > 1 and sends:
        fill_drain = min(sends[0], 2 * (layout.pp * job.vpp - 1))
        steady, edges = 0.0, p2p * fill_drain / sends[0]
    else:
        steady, edges = p2p, 0.0
    cp = exposed_cp_s(context, job, hw)
    pipeline = (per_mb + (tp + steady + cp) / m) * m * (1 + bubble) + edges
    exposed = {"dp": exposed_dp_s(dp, job, per_mb, hw, tp), "tp": tp, "pp": steady + edges + tied, "cp": cp}
    # what ran beside compute (data-parallel, ring attention's and pipelined TP's) slowed the compute it overlapped
    hidden = sum(comm[d] for d in ("dp", "tp", "cp")) - exposed["dp"] - exposed["tp"] - exposed["cp"]
    memory_bound = {"optimizer": optimizer_s(job, hw), "grad_accumulation": grad_accumulation_s(job, hw),
                    "fsdp_copies": fsdp_copies_s(job, hw),
                    "contention": hw.overlap_slowdown * min(max(0.0, hidden), per_mb * m)}
    step = pipeline + exposed["dp"] + tied + sum(memory_bound.values())
    return StepTime(step_s=step, compute_s=per_mb * m, bubble_fraction=bubble, exposed_comm_s=exposed, comm_s=comm,
                    memory_bound_s=memory_bound)


def power_w(busy_fraction: float, hw: Hardware) -> Optional[float]:
    if hw.idle_power_w is None or hw.peak_power_w is None:
        return None
    return hw.idle_power_w + (hw.peak_power_w - hw.idle_power_w) * min(1.0, busy_fraction)


def alcf_fom(m: Any, global_batch_size: int, step_s: float) -> float:
    """ALCF-4 figure of merit: (6·s·d² + s²·d)·b·L / T_step."""
    s, d = m.seq_len, m.d_model
    return (6 * s * d * d + s * s * d) * global_batch_size * m.n_layers / step_s
