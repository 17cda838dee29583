"""Where a step's time goes by resource, and what a faster one would buy.

The step as the cost model builds it, split by the resource each part waits on: GEMMs, the attention kernel,
memory-bound kernels, host time the kernels do not hide, exposed communication per parallel dimension, the
pipeline bubble and the optimizer; then the step again with one resource twice as fast (the large-GEMM rate,
the memory bandwidth, the links inside a node, the network between nodes), as Calculon's sensitivity studies
do (Isaev et al., "Calculon: a methodology and tool for high-level co-design of systems and large language
models", SC 2023). A speed-up near 1 says that resource does not bound the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from harness.costmodel.comm import Collective
from harness.costmodel.kernels import kernel_s
from harness.costmodel.layout import Job
from harness.costmodel.timing import Hardware, StepTime, busiest_stage, compute_kernels, step_time


def _scaled_fabric(hw: Hardware, **changes: Callable[[Any], Any]) -> Hardware:
    fabric = hw.fabric
    return dataclasses.replace(hw, fabric=dataclasses.replace(
        fabric, **{key: change(getattr(fabric, key)) for key, change in changes.items()}))


def _times(factor: float) -> Callable[[Any], Any]:
    return lambda v: None if v is None else v * factor


SCENARIOS: dict[str, Callable[[Hardware], Hardware]] = {
    "2x GEMM rate": lambda hw: dataclasses.replace(hw, gemm_efficiency=hw.gemm_efficiency * 2),
    "2x memory bandwidth": lambda hw: dataclasses.replace(
        hw, memory_bw=None if hw.memory_bw is None else hw.memory_bw * 2),
    "2x intra-node bandwidth": lambda hw: _scaled_fabric(
        hw, link_bw=_times(2), links=lambda links: tuple(tuple(x * 2 for x in row) for row in links),
        package_bw=_times(2)),
    "2x inter-node bandwidth": lambda hw: _scaled_fabric(hw, nic_bw=_times(2)),
}
"""Each resource doubled, as the Hardware the step is timed on."""


def time_by_resource(job: Job, hw: Hardware, timed: StepTime) -> dict[str, float]:
    """Seconds per step on the busiest rank by what they wait on: compute split by kernel class, exposed
    communication, the optimizer's passes, and the pipeline bubble; they add up to the step."""
    rates = hw.rates(job)
    block, head = compute_kernels(job)
    layers, last = busiest_stage(job, hw)  # the rank the step's compute is priced on
    by_class = {"gemm": 0.0, "attention": 0.0, "memory": 0.0}
    for kernels, times in ((block, layers), (head, int(last))):
        for k in kernels:
            by_class[k.kind] += kernel_s(k, rates) * times
    device = sum(by_class.values())
    host = timed.compute_s / job.micro_batches - device  # launches not hidden, overheads per block and step
    scale = job.micro_batches
    out = {f"compute: {kind}": seconds * scale for kind, seconds in by_class.items()}
    out["compute: host"] = max(0.0, host) * scale
    out.update({f"exposed comm: {dim}": seconds for dim, seconds in timed.exposed_comm_s.items()})
    out.update(timed.memory_bound_s)
    # The bubble idles the stage for (p-1)/(v·m) of everything that runs per micro-batch (compute, TP traffic,
    # blocking sends): what the parts above leave of the step.
    out["pipeline bubble"] = max(0.0, timed.step_s - sum(out.values()))
    return out


def what_if(job: Job, colls: list[Collective], hw: Hardware, step_s: float) -> dict[str, dict[str, float]]:
    """The step with each resource of SCENARIOS doubled: its time and the speed-up over `step_s`."""
    out = {}
    for name, change in SCENARIOS.items():
        timed = step_time(job, colls, change(hw))
        if isinstance(timed, StepTime):
            out[name] = {"step_time_s": timed.step_s, "speedup": step_s / timed.step_s}
    return out
