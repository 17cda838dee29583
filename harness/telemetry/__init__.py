"""Power, energy and utilisation telemetry: one module per source, one sampler, one summary.

`make_sampler` picks this rank's source (`telemetry.source`, or by device with `auto`) and
returns a `Sampler` that always works: with no source it still measures the process (psutil)
and carries the reason power was not measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from harness.telemetry.base import DeviceId, Source, SourceUnavailable
from harness.telemetry.sampler import Sampler, StepReading


def _gpu_source(name: str, ids: list[DeviceId]) -> Source:
    from harness.telemetry.amd import AmdSmiSource
    from harness.telemetry.nvml import NvmlSource
    from harness.telemetry.rocm_smi import RocmSmiSource

    factories: dict[str, Callable[[list[DeviceId]], Source]] = {
        "nvml": NvmlSource, "amdsmi": AmdSmiSource, "rocm-smi": RocmSmiSource}
    return factories[name](ids)


def open_source(choice: str, *, device_type: str, device_index: Optional[int], local_rank: int, rocm: bool,
                powercap_root: Path) -> tuple[Optional[Source], Optional[str], bool]:
    """(source, reason none was opened, shared): shared means local rank 0 measures this host's RAPL."""
    if choice == "none":
        return None, "telemetry.source=none", False
    if device_type == "cuda":
        if choice == "rapl":
            return None, "telemetry.source=rapl measures CPUs; this rank runs on a GPU", False
        from harness.telemetry.devices import cuda_device_id

        ids = [cuda_device_id(device_index or 0)]
        order = [choice] if choice != "auto" else (["amdsmi", "rocm-smi"] if rocm else ["nvml"])
        reasons = []
        for name in order:
            try:
                return _gpu_source(name, ids), None, False
            except SourceUnavailable as exc:
                reasons.append(f"{name}: {exc}")
        return None, "; ".join(reasons), False
    if choice not in ("auto", "rapl"):
        return None, f"telemetry.source={choice} measures GPUs; this rank runs on the CPU", False
    if local_rank != 0:
        return None, None, True
    from harness.telemetry.rapl import RaplSource

    try:
        return RaplSource(powercap_root), None, False
    except SourceUnavailable as exc:
        return None, f"no GPU, and RAPL is unavailable: {exc}", False


def make_sampler(telemetry: Any, *, device_type: str, device_index: Optional[int], local_rank: int, rank: int,
                 host: str, warmup_steps: int, rocm: bool = False) -> Sampler:
    source, reason, shared = open_source(telemetry.source, device_type=device_type, device_index=device_index,
                                         local_rank=local_rank, rocm=rocm, powercap_root=Path(telemetry.powercap_root))
    return Sampler(source, reason=reason, shared=shared, interval_s=telemetry.interval_ms / 1e3,
                   idle_s=telemetry.idle_s, warmup_steps=warmup_steps, host=host, rank=rank)


__all__ = ["Sampler", "StepReading", "make_sampler", "open_source"]
