"""A torch.profiler Chrome trace as plain records, the step windows in it, and interval arithmetic.

The format is Kineto's Chrome trace JSON (`export_chrome_trace`, gzipped when the name ends in .gz):
complete events (`"ph": "X"`) with `ts`/`dur` in microseconds, `cat` (`cpu_op`, `user_annotation`,
`kernel`, `gpu_memcpy`, ...), `tid` and `args` (`Input Dims`, `Input type` with record_shapes), and
the job's `distributedInfo` (rank, world size, backend). Both analyses (`cpu`, `gpu`) start here.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

PHASES = SimpleNamespace(forward="harness.forward", backward="harness.backward", optimizer="harness.optimizer",
                         pipeline="harness.pipeline", data="harness.data", metrics="harness.metrics")
"""`record_function` names the trainer and the backends mark a step's phases with (user annotations in the
trace). `pipeline` is a whole pipeline schedule, DeepSpeed's or torch.distributed.pipelining's (forward and backward
interleave inside it);
`metrics` is the trainer's one collective per step that reduces loss, memory and telemetry."""

STEP = re.compile(r"ProfilerStep#(\d+)$")
HOST_RANGE = "user_annotation"
"""The category of `record_function` ranges on the host. Kineto also mirrors them onto the GPU timeline
(`gpu_user_annotation`, which HTA drops too): steps, phases and collective markers are read from the host's."""


@dataclass(frozen=True)
class Event:
    name: str
    cat: str
    ts: float
    dur: float
    tid: Any
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def end(self) -> float:
        return self.ts + self.dur


@dataclass
class Trace:
    """One rank's trace: its complete events and the profiler steps it recorded."""

    events: list[Event]
    distributed: dict[str, Any]
    steps: dict[int, tuple[float, float]]  # step index: (start, end) in µs

    @property
    def rank(self) -> int:
        return int(self.distributed.get("rank", 0))

    @functools.cached_property
    def has_kernels(self) -> bool:
        """An accelerator trace (its kernels are what the GPU analyses read), not a CPU-only one."""
        return any(e.cat == "kernel" for e in self.events)


def load(path: Path) -> Trace:
    """Read a trace written by `torch.profiler.profile.export_chrome_trace` (plain or gzipped)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as handle:
        data = json.load(handle)
    raw = data["traceEvents"] if isinstance(data, dict) else data
    events = [Event(e["name"], e.get("cat", ""), float(e["ts"]), float(e.get("dur", 0.0)), e.get("tid"),
                    e.get("args") or {}) for e in raw if e.get("ph") == "X" and "ts" in e]
    steps = {int(m.group(1)): (e.ts, e.end) for e in events if e.cat == HOST_RANGE and (m := STEP.match(e.name))}
    distributed = data.get("distributedInfo", {}) if isinstance(data, dict) else {}
    return Trace(events, distributed, steps)


Intervals = list[tuple[float, float]]


def union(spans: Iterable[tuple[float, float]]) -> Intervals:
    """Sorted, non-overlapping intervals covering `spans`."""
    out: Intervals = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def intersect(a: Intervals, b: Intervals) -> Intervals:
    """The intersection of two unions."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: Intervals, b: Intervals) -> Intervals:
    """`a` without `b` (both unions), in one pass over each."""
    out, j = [], 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        cut, k = start, j
        while k < len(b) and b[k][0] < end:
            if b[k][0] > cut:
                out.append((cut, b[k][0]))
            cut = max(cut, b[k][1])
            k += 1
        if cut < end:
            out.append((cut, end))
    return out


def length(intervals: Intervals) -> float:
    return sum(end - start for start, end in intervals)


def clip(intervals: Intervals, window: tuple[float, float]) -> Intervals:
    return intersect(intervals, [window])


def phases_ms(trace: Trace, windows: list[tuple[float, float]]) -> list[dict[str, float]]:
    """Time in each marked phase of each step window (ms; nested markers of one phase counted once); each
    phase's union is built once for the whole trace, then clipped to every window."""
    spans = {key: union((e.ts, e.end) for e in trace.events if e.name == name and e.cat == HOST_RANGE)
             for key, name in vars(PHASES).items()}
    return [{key: length(clip(s, window)) / 1e3 for key, s in spans.items() if s} for window in windows]
