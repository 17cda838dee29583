"""The CPU fallback breakdown: where a step's time goes on a trace without accelerator kernels (gloo runs).

Holistic Trace Analysis classifies GPU kernels and finds nothing on a CPU trace (its temporal breakdown
raises, its overlap is NaN), so here the same split comes from the profiler's own CPU events:
- compute: the operators (`cpu_op` events: aten ops, autograd nodes) on the threads that run the model,
  minus the time inside collective calls there (c10d's calls, and gloo's point-to-point sends and
  receives, which run on the calling thread);
- communication: the collectives' `gloo:*` events (on gloo's worker threads from enqueue to completion,
  waits for peers included; copies gloo's threads make count here, not as compute) and the c10d calls
  that hand them over;
- overlap: communication while an operator runs (DDP's bucketed all-reduce during backward, FSDP's
  prefetch);
- idle: the rest of the step (Python between operators, waits for data, the scheduler).
Each is a union of intervals clipped to the step's `ProfilerStep#k` span, so compute + exposed
communication + idle = the step's time, exactly.
"""

from __future__ import annotations

from typing import Any

from harness.trace.events import HOST_RANGE, Trace, clip, intersect, length, subtract, union

COMM_CALL = ("c10d::", "record_param_comms")


def step_breakdowns(trace: Trace, windows: list[tuple[float, float]]) -> list[dict[str, Any]]:
    """ms of compute, communication, their overlap, exposed communication and idle time in each step window
    (the unions are built once for the whole trace, then clipped to each step)."""
    main = {e.tid for e in trace.events if e.cat == HOST_RANGE and e.name.startswith("ProfilerStep#")}
    collectives = [e for e in trace.events if e.cat == HOST_RANGE and e.name.startswith("gloo:")]
    workers = {e.tid for e in collectives} - main
    inline = union([*((e.ts, e.end) for e in trace.events if e.name.startswith(COMM_CALL)),  # the training
                    *((e.ts, e.end) for e in collectives if e.tid in main)])  # thread itself waits in these
    ops = union((e.ts, e.end) for e in trace.events
                if e.cat == "cpu_op" and e.tid not in workers and not e.name.startswith(COMM_CALL))
    compute_all = subtract(ops, inline)
    comm_all = union([*inline, *((e.ts, e.end) for e in collectives)])
    out = []
    for window in windows:
        compute, comm = clip(compute_all, window), clip(comm_all, window)
        busy = union([*compute, *comm])
        step = window[1] - window[0]
        overlap = length(intersect(compute, comm))
        out.append({"step_ms": step / 1e3, "compute_ms": length(compute) / 1e3, "comm_ms": length(comm) / 1e3,
                    "overlap_ms": overlap / 1e3, "exposed_comm_ms": (length(comm) - overlap) / 1e3,
                    "idle_ms": (step - length(busy)) / 1e3})
    return out
