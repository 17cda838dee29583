"""Communication per device per optimizer step, by collective and parallel dimension, and the links it crosses.

Volumes use the ring (bandwidth-optimal) algorithms: over p ranks an all-reduce of S bytes sends
2(p−1)/p·S per rank, an all-gather or reduce-scatter whose full tensor is S sends (p−1)/p·S
(Thakur, Rabenseifner & Gropp 2005; Patarasuk & Yuan 2009). So DDP moves 2Ψ·bytes per step,
ZeRO-1/2 the same (reduce-scatter + all-gather), ZeRO-3 and FSDP 3Ψ·bytes (Rajbhandari et al. 2020,
section 7). Tensor parallelism all-reduces the b·s·h activations twice per layer in the forward and
twice in the backward, once more per recomputed sub-layer (Narayanan et al. 2021, section 2.3;
Korthikanti et al. 2022: sequence parallelism turns each all-reduce into an all-gather and a
reduce-scatter of the same volume). Pipeline stages send b·s·h activations forward and their
gradients backward once per micro-batch and virtual stage.

Rank order is Megatron's and DeepSpeed's (TP fastest, then DP, then PP): a group stays inside a
node when its span of consecutive ranks fits in `devices_per_node`.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.costmodel.layout import Job, layers_per_stage, stage_params
from harness.costmodel.memory import shard_degrees, state_bytes_per_param

RING_FACTOR = {"all_reduce": lambda p: 2 * (p - 1) / p, "all_gather": lambda p: (p - 1) / p,
               "reduce_scatter": lambda p: (p - 1) / p, "send_recv": lambda p: 1.0}


@dataclass(frozen=True)
class Collective:
    dim: str
    """dp | tp | pp."""
    kind: str
    """all_reduce | all_gather | reduce_scatter | send_recv."""
    payload_bytes: float
    """The full tensor of one call (the gathered or reduced size), as a profiler records it."""
    calls: float
    """Calls per optimizer step."""
    group: int
    """Ranks in the group."""
    intra_node: bool

    @property
    def wire_bytes(self) -> float:
        """Bytes this device sends per step (what it receives is the same)."""
        return RING_FACTOR[self.kind](self.group) * self.payload_bytes * self.calls


def _intra(span: int, job: Job) -> bool:
    return span <= job.devices_per_node


def dp_collectives(job: Job) -> list[Collective]:
    """Gradient reduction and parameter gathering over the data-parallel group, per backend and stage."""
    layout = job.layout
    dp, m = layout.dp, job.micro_batches
    if dp == 1:
        return []
    params = stage_params(job)
    per = state_bytes_per_param(job.backend, job.precision)
    intra = _intra(layout.tp * dp, job)

    def c(kind: str, payload: float, calls: float, group: int = dp, inside: bool = intra) -> Collective:
        return Collective("dp", kind, payload, calls, group, inside)

    if job.backend == "fsdp":
        return _fsdp_collectives(job, params, c)
    stage = layout.zero_stage
    if stage == 0:
        return [c("all_reduce", params * per.grads, 1)]
    if stage == 1:
        return [c("reduce_scatter", params * per.grads, 1), c("all_gather", params * per.weights, 1)]
    if stage == 2:  # DeepSpeed reduces partitioned gradients in every micro-batch's backward
        return [c("reduce_scatter", params * per.grads, m), c("all_gather", params * per.weights, 1)]
    return [c("all_gather", params * per.weights, 2 * m), c("reduce_scatter", params * per.grads, m)]


def _fsdp_collectives(job: Job, params: float, c) -> list[Collective]:  # type: ignore[no-untyped-def]
    """FSDP2: parameters gathered in the compute dtype, gradients reduced in fp32, once per step.

    Fabric's `no_backward_sync` skips the reduce-scatter of all but the last micro-batch. With
    full_shard every parameter, the root module's too, is gathered again for the backward: that is
    what torch 2.13's profiler records (tests/test_comm_volume.py), although FSDP2's documentation
    describes keeping the root unsharded after forward.
    """
    m, dp = job.micro_batches, job.layout.dp
    if job.sharding == "no_shard":
        return [c("all_reduce", params * 4, 1)]
    n = shard_degrees(job).weights
    inside = _intra(job.layout.tp * n, job)
    gathers = 2 if job.sharding in ("full_shard", "hybrid_shard") else 1
    out = [c("all_gather", params * job.act_bytes, gathers * m, n, inside)]
    out.append(c("reduce_scatter", params * 4, 1, n, inside))
    if job.sharding == "hybrid_shard" and dp > n:
        out.append(c("all_reduce", params * 4 / n, 1, dp // n, False))
    return out


def tp_collectives(job: Job) -> list[Collective]:
    layout = job.layout
    t = layout.tp
    if t == 1:
        return []
    payload = layout.micro_batch_size * job.model.seq_len * job.model.d_model * job.act_bytes
    per_layer = 4 + {"full": 2, "selective": 1}.get(job.checkpointing, 0)
    calls = (per_layer * layers_per_stage(job) + 2) * job.micro_batches  # + embedding forward, head backward
    intra = _intra(t, job)
    if job.sequence_parallel:
        return [Collective("tp", "all_gather", payload, calls, t, intra),
                Collective("tp", "reduce_scatter", payload, calls, t, intra)]
    return [Collective("tp", "all_reduce", payload, calls, t, intra)]


def pp_collectives(job: Job) -> list[Collective]:
    layout = job.layout
    if layout.pp == 1:
        return []
    payload = layout.micro_batch_size * job.model.seq_len * job.model.d_model * job.act_bytes
    calls = 2 * job.micro_batches * job.vpp  # activations forward, their gradients backward
    intra = _intra(layout.world_size, job)
    if job.software.pp_scatter_gather and layout.tp > 1:
        return [Collective("pp", "send_recv", payload / layout.tp, calls, 2, intra),
                Collective("pp", "all_gather", payload, calls, layout.tp, _intra(layout.tp, job))]
    return [Collective("pp", "send_recv", payload, calls, 2, intra)]


def collectives(job: Job) -> list[Collective]:
    return dp_collectives(job) + tp_collectives(job) + pp_collectives(job)


def bytes_by_dim(colls: list[Collective]) -> dict[str, float]:
    out = {dim: sum(c.wire_bytes for c in colls if c.dim == dim) for dim in ("dp", "tp", "pp")}
    out["total"] = sum(out.values())
    return out
