"""Step time, energy, figure of merit and projections.

Step time = compute + exposed communication, stretched by the pipeline bubble:
- compute: every GEMM takes (F + F½)/(peak · e) — e the large-GEMM efficiency, F½ the size at
  which a GEMM reaches half of it (a fixed fill/tail cost per kernel, the effect Calculon and
  Megatron's own sweeps tabulate as GEMM efficiency against size); the non-GEMM kernels (norms,
  softmax, GELU, dropout, residuals) are memory-bound, so they take a few passes over the stored
  activation bytes at the device memory bandwidth; the optimizer streams its states once; a host
  overhead per block and per micro-batch (operator dispatch, autograd) that only a CPU exposes.
- communication: per collective, latency + wire bytes / (link bandwidth · efficiency) (comm.py);
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

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

from harness.core.registry import CHECKPOINTING, pipeline_bubble
from harness.costmodel.comm import Collective
from harness.costmodel.flops import forward_flops_per_token, model_key, recomputed_forward_per_token
from harness.costmodel.layout import Job, layers_per_stage
from harness.costmodel.memory import layer_activation_bytes
from harness.costmodel.peaks import device_entry, gemm_efficiency
from harness.models.config import block_linears


@dataclass(frozen=True)
class Hardware:
    """The system profile's numbers, in base units."""

    peak_flops: float
    gemm_efficiency: float
    gemm_half_flops: float
    hbm_bw: Optional[float]
    elementwise_passes: float
    intra_bw: Optional[float]
    inter_bw: Optional[float]
    comm_efficiency: float
    comm_latency_s: float
    overlap_comm: bool
    layer_overhead_s: float
    step_overhead_s: float
    idle_power_w: Optional[float]
    peak_power_w: Optional[float]
    compute_units: Optional[int] = None
    """SMs/CUs a GEMM's output tiles fill in waves (peaks.py); None: no wave quantization (a CPU)."""


def hardware(system: Any, peak_tflops: float) -> Hardware:
    gbps = lambda v: None if v is None else v * 1e9  # noqa: E731
    return Hardware(
        peak_flops=peak_tflops * 1e12,
        gemm_efficiency=gemm_efficiency(system),
        gemm_half_flops=system.gemm_half_gflop * 1e9,
        hbm_bw=gbps(system.hbm_bw_gb_per_s),
        elementwise_passes=system.elementwise_passes,
        intra_bw=gbps(system.intra_node_bw_gb_per_s),
        inter_bw=gbps(system.inter_node_bw_gb_per_s),
        comm_efficiency=system.comm_efficiency,
        comm_latency_s=system.comm_latency_us * 1e-6,
        overlap_comm=getattr(system, "overlap_comm", True),
        layer_overhead_s=system.layer_overhead_us * 1e-6,
        step_overhead_s=system.step_overhead_us * 1e-6,
        idle_power_w=system.idle_power_w,
        peak_power_w=system.peak_power_w,
        compute_units=getattr(device_entry(system), "compute_units", None),
    )


def gemm_time(flops: float, calls: float, hw: Hardware) -> float:
    return (flops + calls * hw.gemm_half_flops) / (hw.peak_flops * hw.gemm_efficiency)


GEMM_TILE = (256, 128)
"""Output tile of the large 16-bit GEMM kernels (NVIDIA, 'Matrix Multiplication Background User's Guide':
tile and wave quantization, with the A100's 256×128 example)."""


def wave_efficiency(rows: int, cols: int, units: Optional[int]) -> float:
    """Share of the launched tile work that is useful: the output is cut into tiles, which run in waves of
    one tile per SM/CU; partial tiles and a partial last wave compute for nothing."""
    if units is None:
        return 1.0
    tiles = -(-rows // GEMM_TILE[0]) * -(-cols // GEMM_TILE[1])
    waves = -(-tiles // units)
    return rows * cols / (waves * units * GEMM_TILE[0] * GEMM_TILE[1])


@lru_cache(maxsize=4096)
def linear_wave_efficiency(tokens: int, shapes: tuple[tuple[int, int], ...], units: Optional[int]) -> float:
    """FLOP-weighted wave efficiency of linears (in, out) over their forward (tokens × out), input-gradient
    (tokens × in) and weight-gradient (in × out) GEMMs, all of equal FLOPs."""
    work = sum(3 * k * n for k, n in shapes)
    time = sum(k * n * (1 / wave_efficiency(tokens, n, units) + 1 / wave_efficiency(tokens, k, units)
                        + 1 / wave_efficiency(k, n, units)) for k, n in shapes)
    return work / time


def layer_linears(job: Job) -> tuple[tuple[int, int], ...]:
    """(in, out) of one block's linears on one TP rank (the model's description: column splits the outputs, row
    the inputs)."""
    t = job.layout.tp
    return tuple((spec.n_in, spec.n_out // t) if spec.split == "column" else (spec.n_in // t, spec.n_out)
                 for spec in block_linears(job.model))


def micro_batch_compute_s(job: Job, hw: Hardware) -> float:
    """Forward + backward (+ recompute) of one micro-batch on one rank of the busiest stage."""
    layout = job.layout
    # What it depends on, as a key: the planner asks for the same compute under many DP layouts.
    key = (model_key(job.model), layout.tp, layout.pp, layout.micro_batch_size, job.checkpointing,
           job.checkpoint_every_n, job.sequence_parallel, job.software, job.precision, hw)
    value = _COMPUTE.get(key)
    if value is None:
        if len(_COMPUTE) >= 100_000:
            _COMPUTE.clear()
        value = _COMPUTE[key] = _compute_s(job, hw)
    return value


_COMPUTE: dict[tuple[Any, ...], float] = {}


def _compute_s(job: Job, hw: Hardware) -> float:
    m, layout = job.model, job.layout
    tokens = layout.micro_batch_size * m.seq_len
    fwd = forward_flops_per_token(m)
    layers = layers_per_stage(job)
    recompute = recomputed_forward_per_token(fwd, job.checkpointing, job.checkpoint_every_n,
                                             early_stop=job.software.recompute_early_stop) / fwd.n_layers
    per_layer_flops = (3 * fwd.layer + recompute) * tokens / layout.tp
    linears = 5 if m.activation == "swiglu" else 4  # qkv, proj, fc (, gate), fc2
    fwd_calls = linears + 2  # + QK^T and AV
    modes = job.checkpoint_modes
    recompute_calls = sum(share * (CHECKPOINTING[mode].gemm_calls if CHECKPOINTING[mode].gemm_calls is not None
                                   else fwd_calls) for mode, share in modes.items())
    calls_per_layer = 3 * fwd_calls + recompute_calls
    logits_flops = 3 * fwd.logits * tokens / layout.tp
    # Wave quantization slows the linears (the rest of a block's GEMM work, core attention, is left at e).
    wave = linear_wave_efficiency(tokens, layer_linears(job), hw.compute_units)
    linear_share = (fwd.attn_gemms + fwd.mlp) / fwd.layer
    stretch = linear_share / wave + 1 - linear_share
    head = linear_wave_efficiency(tokens, ((m.d_model, m.vocab_size // layout.tp),), hw.compute_units)
    gemm = layers * gemm_time(per_layer_flops, calls_per_layer, hw) * stretch + gemm_time(logits_flops, 3, hw) / head
    gemm += layers * hw.layer_overhead_s + hw.step_overhead_s
    if hw.hbm_bw is None:
        return gemm
    stored = layer_activation_bytes(job, "none")
    # Selective recomputation re-runs the elementwise work on exactly the bytes it did not store.
    again = {"full": 4 / 3, "attention": 1.1, "selective": 2 - layer_activation_bytes(job, "selective") / stored}
    recompute_share = sum(share * again.get(mode, 1.0) for mode, share in modes.items())
    moved = hw.elementwise_passes * stored * recompute_share
    return gemm + layers * moved / hw.hbm_bw


def optimizer_s(job: Job, hw: Hardware) -> float:
    """Adam reads weights, gradients and both moments and writes weights and moments: memory-bound."""
    if hw.hbm_bw is None:
        return 0.0
    per = job.state_bytes
    params = job.params_per_rank / job.shards.optimizer
    return params * (2 * (per.weights + per.optimizer) + per.grads) / hw.hbm_bw


def grad_accumulation_s(job: Job, hw: Hardware) -> float:
    """Adding each micro-batch's weight gradients into the step's: per addition a memory-bound pass that reads
    the sum and the new gradient and writes the sum, over the gradients this rank accumulates (its partition
    under ZeRO-2/3, which reduce every micro-batch), unless the software fuses it into the GEMM."""
    software, m = job.software, job.micro_batches
    if hw.hbm_bw is None or software.grad_accumulation_fusion:
        return 0.0
    grads = job.state_bytes.grads
    partitioned = job.spec.deepspeed_engine and job.layout.zero_stage >= 2
    params = job.params_per_rank / (job.shards.grads if partitioned else 1)
    if software.main_grad_bytes:
        return m * params * (2 * software.main_grad_bytes + grads) / hw.hbm_bw
    return (m - 1) * params * 3 * grads / hw.hbm_bw


def collective_s(c: Collective, hw: Hardware) -> Optional[float]:
    if c.group == 1:  # a one-rank group (DeepSpeed's dp=1 reduction) moves nothing
        return 0.0
    bw = hw.intra_bw if c.intra_node else hw.inter_bw
    if bw is None:
        return None
    return c.calls * hw.comm_latency_s + c.wire_bytes / (bw * hw.comm_efficiency)


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
    """Outside the micro-batches: the optimizer step and the gradient accumulation passes."""


def _dp_window(c: Collective, job: Job, per_mb: float) -> tuple[str, float]:
    """The compute a data-parallel collective can run under, named, and its length (0: none).

    Per-micro-batch parameter gathers (FSDP, ZeRO-3) are prefetched during every forward and backward;
    gradient reductions run during the backward of the micro-batches that issue them, if the software
    reduces in buckets as gradients become ready; a distributed optimizer's once-per-step parameter
    gather runs during the next step's first forward only where the software says so.
    """
    m = job.micro_batches
    every = c.calls >= m and c.calls % m == 0
    if c.role == "params":
        if every:
            return "all compute", per_mb * m
        return ("first forward", per_mb / 3) if job.software.param_gather_overlap else ("none", 0.0)
    if not job.grad_reduce_overlap:
        return "none", 0.0
    return ("all backward", per_mb * m * 2 / 3) if every else ("last backward", per_mb * 2 / 3)


def exposed_dp_s(timed: list[tuple[Collective, float]], job: Job, per_mb: float, hw: Hardware) -> float:
    """Data-parallel time on the critical path: each collective hides at most its own window, and all of them
    together at most the union of their windows (one link carries them one after another)."""
    if not hw.overlap_comm:
        return sum(t for _, t in timed)
    windows = [(t, *_dp_window(c, job, per_mb)) for c, t in timed]
    own = sum(max(0.0, t - w) for t, _, w in windows)
    names = {name: w for _, name, w in windows if w > 0}
    union = names.get("all compute") or (max(names.get("all backward", 0.0), names.get("last backward", 0.0))
                                         + names.get("first forward", 0.0))
    return max(own, sum(t for t, _, _ in windows) - union)


def step_time(job: Job, colls: list[Collective], hw: Hardware) -> StepTime | str:
    """The modelled step, or the reason it cannot be modelled (a link bandwidth the profile lacks).

    TP traffic is on the critical path unless the software pipelines it with its GEMMs (then one of TP chunks
    stays exposed, or what the compute cannot cover). Pipeline sends are blocking unless the software overlaps
    them; then only the fill and drain transfers, 2(p·v − 1) of them, are on the critical path.
    """
    comm = {"dp": 0.0, "tp": 0.0, "pp": 0.0}
    dp: list[tuple[Collective, float]] = []
    p2p = tied = 0.0
    for c in colls:
        t = collective_s(c, hw)
        if t is None:
            link = "intra_node_bw_gb_per_s" if c.intra_node else "inter_node_bw_gb_per_s"
            return f"the system profile has no {link} for the {c.dim} {c.kind}"
        comm[c.dim] += t
        if c.dim == "dp":
            dp.append((c, t))
        elif c.role == "p2p":
            p2p += t
        elif c.dim == "pp":
            tied += t
    m, layout = job.micro_batches, job.layout
    per_mb = micro_batch_compute_s(job, hw)
    bubble = pipeline_bubble(job.pp_schedule, layout.pp, job.vpp, m)
    overlap = hw.overlap_comm
    tp = comm["tp"]
    if overlap and job.software.tp_comm_overlap and layout.tp > 1:
        tp = max(tp / layout.tp, tp - per_mb * m)
    sends = [c.calls for c in colls if c.kind == "send_recv"]
    if overlap and job.software.p2p_overlap and sends:
        fill_drain = min(sends[0], 2 * (layout.pp * job.vpp - 1))
        steady, edges = 0.0, p2p * fill_drain / sends[0]
    else:
        steady, edges = p2p, 0.0
    pipeline = (per_mb + (tp + steady) / m) * m * (1 + bubble) + edges
    exposed = {"dp": exposed_dp_s(dp, job, per_mb, hw), "tp": tp, "pp": steady + edges + tied}
    memory_bound = {"optimizer": optimizer_s(job, hw), "grad_accumulation": grad_accumulation_s(job, hw)}
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
