"""Per-step measurements: throughput, FLOP rates, utilisation against the peak, memory."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from harness.costmodel.flops import StepFlops
from harness.costmodel.peaks import PeakLookup, lookup_peak


def resolve_peak(system: Any, precision: str, device: torch.device) -> PeakLookup:
    """A measured peak from the system config wins; else the table by device name; a CPU has none."""
    if system.peak_tflops is not None:
        return PeakLookup(float(system.peak_tflops), system.peak_tflops_source, None)
    if device.type == "cpu":
        return PeakLookup(None, None, "no dense peak is known for a CPU; give a measured one with "
                          "system.peak_tflops and system.peak_tflops_source")
    return lookup_peak(device_name(device), precision)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from harness.run.environment import cpu_model

    return cpu_model()


@dataclass(frozen=True)
class Throughput:
    """Turns an iteration time into the rates reported for it."""

    flops: StepFlops
    tokens_per_step: int
    world_size: int
    peak: PeakLookup

    def rates(self, iter_time_s: float) -> dict[str, Optional[float]]:
        model_tflops = self.flops.model / iter_time_s / self.world_size / 1e12
        hardware_tflops = self.flops.hardware / iter_time_s / self.world_size / 1e12
        peak = self.peak.tflops
        return {
            "iter_time_ms": iter_time_s * 1e3,
            "tokens_per_s": self.tokens_per_step / iter_time_s,
            "model_tflops_per_device": model_tflops,
            "hardware_tflops_per_device": hardware_tflops,
            "mfu": model_tflops / peak if peak else None,
            "hfu": hardware_tflops / peak if peak else None,
        }


class MemoryMeter:
    """Peak memory per step: the CUDA caching allocator's peak on GPU, the process's peak RSS on CPU.

    On CPU only a lifetime peak exists (getrusage), so the figure never falls; it is labelled
    `cpu_peak_rss` to keep it apart from device memory.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"
        # num_alloc_retries counts from process start; retries while building the model are not a step's.
        self._retries = 0 if device.type != "cuda" else torch.cuda.memory_stats(device).get("num_alloc_retries", 0)

    def start_step(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict[str, Optional[float]]:
        if self.device.type == "cuda":
            retries = torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0)
            new, self._retries = retries - self._retries, retries
            return {"peak_memory_mb": torch.cuda.max_memory_allocated(self.device) / 2**20, "alloc_retries": new}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return {"peak_memory_mb": rss / (2**20 if sys.platform == "darwin" else 2**10), "alloc_retries": None}


def live_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage alive in this process now, each storage once (views share one): the
    model state, optimizer state and data a step starts with. The timed loop freezes the collector
    (rank.frozen_gc), and gc.get_objects() does not list frozen objects, which would hide every tensor built before
    the loop (the parameters, DeepSpeed's buckets): they are thawed for the count and frozen again."""
    import gc

    frozen = gc.get_freeze_count() > 0
    if frozen:
        gc.unfreeze()
    try:
        objects = gc.get_objects()
    finally:
        if frozen:
            gc.freeze()
    sizes: dict[int, int] = {}
    for obj in objects:
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
                sizes[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError, TypeError):
                # tensor subclasses that hold no storage, and storages already freed (FSDP2 frees a resharded
                # parameter's unsharded storage: "invalid python storage")
                continue
    return sum(sizes.values())


class TensorPeak:
    """The peak bytes of CPU tensors during one step: the tensors alive when it starts, plus the most the CPU
    allocator held beyond them at any point of the step (torch.profiler's memory events, `Total Allocated`, which
    counts what is allocated while profiling). On a CPU this is what the cost model's memory prediction counts;
    the process's RSS also holds Python, torch's code and freed pages the allocator kept."""

    def __init__(self) -> None:
        self.peak_bytes: Optional[int] = None

    def __enter__(self) -> "TensorPeak":
        from torch.profiler import ProfilerActivity, profile

        self._base = live_tensor_bytes()
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        import json
        import tempfile

        self._profiler.__exit__(*exc)
        if exc[0] is not None:
            return
        with tempfile.NamedTemporaryFile(suffix=".json") as handle:
            self._profiler.export_chrome_trace(handle.name)
            events = json.loads(Path(handle.name).read_text()).get("traceEvents", [])
        held = [e["args"].get("Total Allocated", 0) for e in events if e.get("name") == "[memory]" and e.get("args")]
        self.peak_bytes = self._base + max([0, *held])
