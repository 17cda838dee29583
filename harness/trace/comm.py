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

from harness.trace.events import HOST_RANGE, PHASES, Event, Trace, clip, length, union

ITEM_BYTES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "long": 8, "int": 4,
              "unsigned char": 1, "signed char": 1, "bool": 1, "short int": 2, "short unsigned int": 2,
              "unsigned int": 4, "long unsigned int": 8, "long long int": 8, "c10::complex<float>": 8,
              "c10::complex<double>": 16, "c10::complex<c10::Half>": 4, "c10::Float8_e4m3fn": 1,
              "c10::Float8_e5m2": 1, "c10::Float8_e4m3fnuz": 1, "c10::Float8_e5m2fnuz": 1, "c10::Float8_e8m0fnu": 1}
"""Bytes per element of the C++ type names the profiler writes as `Input type`; a type missing here is listed
in the kind's `unsized_types` instead of being counted as 0 bytes silently."""
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv", "broadcast", "reduce", "gather",
         "scatter", "barrier")
OTHER = "other"
"""Collective markers no kind covers (`nccl:coalesced`, `nccl:batch_isend_irecv`): kept visible, not dropped."""
MARKER = re.compile(r"^(gloo|nccl|rccl|xccl):(\S+)")
KERNEL_KINDS = {"AllReduce": "all_reduce", "AllGather": "all_gather", "ReduceScatter": "reduce_scatter",
                "SendRecv": "send_recv", "Send": "send_recv", "Recv": "send_recv", "Broadcast": "broadcast",
                "AllToAll": "all_to_all", "Reduce": "reduce"}
BOOKKEEPING = "harness_metrics"
"""The kind given to collectives the trainer issues inside its `harness.metrics` marker."""
GLOO_KIND = {"reduce_scatter": "all_reduce"}
"""ProcessGroupGloo has no reduce_scatter_tensor, so FSDP2 on gloo reduces gradients with an all-reduce of the
same whole tensor (what its trace records); NCCL runs the reduce-scatter."""
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


def collective_kind(name: str) -> Optional[str]:
    """`gloo:all_reduce` → all_reduce, `nccl:_all_gather_base` → all_gather, `nccl:send 0->1` → send_recv,
    `gloo:recv` → None (counted at its sender), an unknown collective → other, anything else → None."""
    match = MARKER.match(name)
    if not match:
        return None
    op = re.sub(r"_(base|coalesced|into_tensor|tensor|oop|single)\b", "", match.group(2).strip("_"))
    op = op.replace("allreduce", "all_reduce").replace("allgather", "all_gather").replace("alltoall", "all_to_all")
    if "barrier" in op:
        return "barrier"
    if op in ("send", "recv"):
        return "send_recv" if op == "send" else None
    return next((kind for kind in KINDS if op.startswith(kind)), OTHER)


def kernel_kind(name: str) -> Optional[str]:
    """The collective an NCCL/RCCL kernel's name says it runs (`ncclDevKernel_AllReduce_Sum_f32_RING_LL` →
    all_reduce); `other` for a communication kernel whose name does not say (NCCL's grouped `Generic`)."""
    if not name.startswith(("nccl", "rccl")):
        return None
    match = re.search(r"Kernel_([A-Za-z]+?)(?:_|\(|$)", name)
    return KERNEL_KINDS.get(match.group(1), OTHER) if match else OTHER


def input_bytes(args: dict[str, Any], unsized: set[str]) -> float:
    """Bytes of a marker's tensor inputs (a 0-d tensor included); unknown element types are added to `unsized`."""
    total = 0.0
    for shape, dtype in zip(args.get("Input Dims") or [], args.get("Input type") or []):
        if not dtype or dtype in ("TensorList", "Scalar") or not isinstance(shape, list):
            continue
        if dtype not in ITEM_BYTES:
            unsized.add(dtype)
        total += math.prod(shape) * ITEM_BYTES.get(dtype, 0)
    return total


def markers(trace: Trace) -> list[tuple[str, Event]]:
    """(kind, event) of every collective marker a rank issued on the host (receives left out; Kineto's copies
    of the ranges on the GPU timeline, `gpu_user_annotation`, are not markers)."""
    bookkeeping = union((e.ts, e.end) for e in trace.events if e.name == PHASES.metrics and e.cat == HOST_RANGE)
    out = []
    for e in trace.events:
        if e.cat == HOST_RANGE and (kind := collective_kind(e.name)):
            out.append((BOOKKEEPING if any(a <= e.ts < b for a, b in bookkeeping) else kind, e))
    return out


def _kernel_kinds(trace: Trace, issued: list[tuple[str, Event]]) -> dict[str, list[tuple[float, float]]]:
    """Each communication kernel's span under the kind of the marker that launched it: the kernel's
    `correlation` names its launch (cudaLaunchKernel, on the host), which lies inside the marker's range on
    the same thread. A kernel whose launch is not in the trace goes by its own name."""
    launches = {e.args["correlation"]: e for e in trace.events if e.cat in LAUNCH_CATS and "correlation" in e.args}
    by_thread: dict[Any, list[tuple[str, Event]]] = {}
    for kind, marker in issued:
        by_thread.setdefault(marker.tid, []).append((kind, marker))
    out: dict[str, list[tuple[float, float]]] = {}
    for e in trace.events:
        if e.cat != "kernel" or not (named := kernel_kind(e.name)):
            continue
        launch = launches.get(e.args.get("correlation"))
        enclosing = [(m.dur, kind) for kind, m in by_thread.get(launch.tid, []) if m.ts <= launch.ts <= m.end] \
            if launch is not None else []
        out.setdefault(min(enclosing)[1] if enclosing else named, []).append((e.ts, e.end))
    return out


def by_kind(trace: Trace, window: tuple[float, float]) -> dict[str, dict[str, Any]]:
    """Calls, bytes put in and time (ms) per collective kind for the collectives issued in `window`.

    Time: on a trace with GPU kernels, the communication kernels' time in the window (overlapping kernels
    of one kind counted once), each under the kind of the marker that launched it; otherwise the markers'
    own time (gloo's worker threads). The trainer's own reduction of loss, memory and telemetry
    (`harness.metrics`) is its own entry, not the model's communication.
    """
    out: dict[str, dict[str, Any]] = {}
    issued = markers(trace)
    unsized: dict[str, set[str]] = {}
    for kind, event in issued:
        if window[0] <= event.ts < window[1]:
            entry = out.setdefault(kind, {"calls": 0, "bytes": 0.0, "time_ms": 0.0})
            entry["calls"] += 1
            entry["bytes"] += input_bytes(event.args, unsized.setdefault(kind, set()))
    spans = _kernel_kinds(trace, issued) if trace.has_kernels else {}
    if not trace.has_kernels:
        for kind, event in issued:
            spans.setdefault(kind, []).append((event.ts, event.end))
    for kind, intervals in spans.items():
        time_ms = length(clip(union(intervals), window)) / 1e3
        if time_ms or kind in out:
            out.setdefault(kind, {"calls": 0, "bytes": 0.0, "time_ms": 0.0})["time_ms"] = time_ms
    for kind, types in unsized.items():
        if types:
            out[kind]["unsized_types"] = sorted(types)
    return out


def predicted_bytes(collectives: list[dict[str, Any]], gloo: bool) -> dict[str, float]:
    """The cost model's collectives (its estimate's `collectives`) as bytes per rank per step by kind, in the
    trace's convention (what a rank puts in: an all-gather's payload over its group); on gloo, kinds as
    ProcessGroupGloo runs them."""
    out: dict[str, float] = {}
    for c in collectives:
        kind = GLOO_KIND.get(c["kind"], c["kind"]) if gloo else c["kind"]
        payload = c["payload_bytes"] / c["group"] if c["kind"] == "all_gather" else c["payload_bytes"]
        out[kind] = out.get(kind, 0.0) + payload * c["calls"]
    return out
