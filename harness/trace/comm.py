"""Communication by collective kind from a profiler trace, and the cost model's bytes for the same run.

ProcessGroupGloo and ProcessGroupNCCL mark each collective with a `<backend>:<collective>` annotation
(`gloo:all_reduce`, `nccl:_all_gather_base`, ...) whose `Input Dims`/`Input type` (record_shapes) give the
tensor a rank puts in. On gloo that event runs on the group's worker thread from enqueue to completion,
so its duration is the collective's time, waits for peers included; on a GPU the time is the NCCL/RCCL
kernels' (`ncclDevKernel_AllReduce_...`). Bytes are what each rank puts in: an all-gather's shard, a
reduce-scatter's whole tensor. A receive is counted at its sender.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

from harness.trace.events import PHASES, Trace, clip, length, union

ITEM_BYTES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "long": 8, "int": 4,
              "unsigned char": 1, "signed char": 1, "bool": 1, "short": 2}
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv", "broadcast", "barrier")
MARKER = re.compile(r"^(gloo|nccl|rccl|xccl):(.+)$")
KERNEL_KINDS = {"AllReduce": "all_reduce", "AllGather": "all_gather", "ReduceScatter": "reduce_scatter",
                "SendRecv": "send_recv", "Send": "send_recv", "Recv": "send_recv", "Broadcast": "broadcast",
                "AllToAll": "all_to_all", "Reduce": "all_reduce"}
BOOKKEEPING = "harness_metrics"
"""The kind given to collectives the trainer issues inside its `harness.metrics` marker."""
GLOO_KIND = {"reduce_scatter": "all_reduce"}
"""ProcessGroupGloo has no reduce_scatter_tensor, so FSDP2 on gloo reduces gradients with an all-reduce of the
same whole tensor (what its trace records); NCCL runs the reduce-scatter."""


def collective_kind(name: str) -> Optional[str]:
    """`gloo:all_reduce` → all_reduce, `nccl:_all_gather_base` → all_gather, `gloo:recv` → None (counted at
    its sender), anything that is not a collective marker → None."""
    match = MARKER.match(name)
    if not match:
        return None
    op = re.sub(r"_(base|coalesced|into_tensor|tensor)\b", "", match.group(2).strip("_"))
    op = op.replace("allreduce", "all_reduce").replace("allgather", "all_gather").replace("alltoall", "all_to_all")
    if op in ("send", "recv"):
        return "send_recv" if op == "send" else None
    return next((kind for kind in KINDS if op.startswith(kind)), None)


def kernel_kind(name: str) -> Optional[str]:
    """The collective an NCCL/RCCL kernel runs (`ncclDevKernel_AllReduce_Sum_f32_RING_LL` → all_reduce)."""
    if not name.startswith(("nccl", "rccl")):
        return None
    match = re.search(r"Kernel_([A-Za-z]+?)(?:_|\(|$)", name)
    return KERNEL_KINDS.get(match.group(1)) if match else None


def input_bytes(args: dict[str, Any]) -> float:
    dims, types = args.get("Input Dims") or [], args.get("Input type") or []
    return float(sum(math.prod(shape) * ITEM_BYTES.get(dtype, 0) for shape, dtype in zip(dims, types)
                     if isinstance(shape, list) and shape and all(isinstance(n, int) for n in shape)))


def markers(trace: Trace) -> list[tuple[str, Any]]:
    """(kind, event) of every collective marker a rank issued (receives left out)."""
    return [(kind, e) for e in trace.events if (kind := collective_kind(e.name))]


def by_kind(trace: Trace, window: tuple[float, float]) -> dict[str, dict[str, float]]:
    """Calls, bytes put in and time (ms) per collective kind for the collectives issued in `window`.

    Time: on a GPU trace the communication kernels' time in the window (overlapping kernels counted once
    per kind); otherwise the markers' own time (gloo's worker thread). The trainer's own reduction of
    loss, memory and telemetry (`harness.metrics`) is its own entry, not the model's communication.
    """
    out: dict[str, dict[str, float]] = {}
    bookkeeping = union((e.ts, e.end) for e in trace.events if e.name == PHASES.metrics)
    issued = [(BOOKKEEPING if any(a <= e.ts < b for a, b in bookkeeping) else kind, e)
              for kind, e in markers(trace) if window[0] <= e.ts < window[1]]
    for kind, event in issued:
        entry = out.setdefault(kind, {"calls": 0, "bytes": 0.0, "time_ms": 0.0})
        entry["calls"] += 1
        entry["bytes"] += input_bytes(event.args)
    kernels: dict[str, list[tuple[float, float]]] = {}
    for e in trace.events:
        if e.cat == "kernel" and (kind := kernel_kind(e.name)):
            kernels.setdefault(kind, []).append((e.ts, e.end))
    spans = kernels or {kind: [(e.ts, e.end) for k, e in issued if k == kind] for kind in out}
    for kind, intervals in spans.items():
        entry = out.setdefault(kind, {"calls": 0, "bytes": 0.0, "time_ms": 0.0})
        entry["time_ms"] = length(clip(union(intervals), window)) / 1e3
    return out


def predicted_bytes(cfg: Any, layout: Any, gloo: bool) -> dict[str, float]:
    """The cost model's bytes per rank per step by collective kind, in the trace's convention (what a rank
    puts in: an all-gather's payload over its group); on gloo, kinds as ProcessGroupGloo runs them."""
    from harness.costmodel.comm import collectives
    from harness.costmodel.layout import job_from_config

    out: dict[str, float] = {}
    for c in collectives(job_from_config(cfg, layout)):
        kind = GLOO_KIND.get(c.kind, c.kind) if gloo else c.kind
        payload = c.payload_bytes / c.group if c.kind == "all_gather" else c.payload_bytes
        out[kind] = out.get(kind, 0.0) + payload * c.calls
    return out
