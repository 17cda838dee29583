"""Dense peak throughput per device, each with its source.

An unknown device gets no peak (MFU `null` with the reason), never another device's peak: that
fallback is how torchtitan once reported 152% MFU. A system config may supply a measured peak.
Sparsity figures from datasheets are halved to their dense values here. Compute units: the vendors'
architecture whitepapers (A100 108 SMs, H100 SXM/H200 132, H100 PCIe 114, V100 80; MI250X 110 CUs per GCD,
MI300X 304).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DevicePeak:
    name: str
    pattern: str
    """Regular expression matched (case-insensitive) against the device name torch reports."""
    tflops: dict[str, float | None]
    """Dense TFLOP/s per precision: bf16 and fp16 tensor-core math, fp32 without TF32."""
    source: str
    gemm_efficiency: Optional[float] = None
    """Fraction of the dense 16-bit peak a large bf16 GEMM reaches, measured (None: not known)."""
    gemm_source: Optional[str] = None
    compute_units: Optional[int] = None
    """Streaming multiprocessors (NVIDIA) or compute units (AMD, per GCD) that a GEMM's tiles fill in waves."""


MAMF = ("Maximum Achievable Matmul FLOPS (mean of 100 runs after 50 warm-up, best shape), S. Bekman, "
        "github.com/stas00/ml-engineering compute/accelerator/README.md")

# Order matters: more specific names first (H100 PCIe before H100).
PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak("V100-PCIe", r"V100.*PCIE", {"fp16": 112.0, "bf16": None, "fp32": 14.0},
               "NVIDIA V100 datasheet (PCIe): 112 TFLOP/s fp16 tensor, 14 fp32; no bf16 tensor cores",
               compute_units=80),
    DevicePeak("V100-SXM2", r"V100", {"fp16": 125.0, "bf16": None, "fp32": 15.7},
               "NVIDIA V100 datasheet (SXM2): 125 TFLOP/s fp16 tensor, 15.7 fp32; no bf16 tensor cores",
               compute_units=80),
    DevicePeak("A100", r"A100", {"fp16": 312.0, "bf16": 312.0, "fp32": 19.5},
               "NVIDIA A100 datasheet: 312 TFLOP/s bf16/fp16 dense, 19.5 fp32",
               0.869, f"{MAMF} at 744d01e: A100 SXM 271.2 of 312 TFLOP/s",
               compute_units=108),
    DevicePeak("H100-PCIe", r"H100.*PCIE", {"fp16": 756.0, "bf16": 756.0, "fp32": 51.0},
               "NVIDIA H100 datasheet (PCIe): 1513 with sparsity = 756 dense bf16/fp16, 51 fp32",
               compute_units=114),
    DevicePeak("H100-SXM", r"H100|GH200", {"fp16": 989.0, "bf16": 989.0, "fp32": 67.0},
               "NVIDIA H100 datasheet (SXM): 1979 with sparsity = 989 dense bf16/fp16, 67 fp32",
               0.803, f"{MAMF} at 744d01e: H100 SXM 794.5 of 989 TFLOP/s",
               compute_units=132),
    DevicePeak("H200", r"H200", {"fp16": 989.0, "bf16": 989.0, "fp32": 67.0},
               "NVIDIA H200 datasheet (SXM): 1979 with sparsity = 989 dense bf16/fp16, 67 fp32",
               0.803, f"{MAMF} at 744d01e: H100 SXM 794.5 of 989 TFLOP/s, 'H200 is the same'",
               compute_units=132),
    DevicePeak("MI250X-GCD", r"MI250X?", {"fp16": 191.5, "bf16": 191.5, "fp32": 23.95},
               "AMD Instinct MI250X datasheet: 383 TFLOP/s fp16/bf16 and 47.9 fp32 vector per OAM; "
               "torch sees each of its two GCDs as a device, so half per GCD",
               0.767, f"{MAMF} at 37d41a7 (row removed in 7376725): MI250X one GCD 147.0 of 191.5 TFLOP/s, ROCm 6.2",
               compute_units=110),
    DevicePeak("MI300X", r"MI300X", {"fp16": 1307.4, "bf16": 1307.4, "fp32": 163.4},
               "AMD Instinct MI300X datasheet: 1307.4 TFLOP/s fp16/bf16 dense, 163.4 fp32 vector",
               compute_units=304),
    DevicePeak("Max-1550-tile", r"Max 1550|Data Center GPU Max", {"fp16": None, "bf16": 256.0, "fp32": None},
               "Measured bf16 GEMM per tile at 1.5 GHz on Aurora (ALCF-4 LLM benchmark, "
               "github.com/argonne-lcf/alcf4_aibenchmarks, LLM_modeling_and_projection-LLM.pdf)"),
)


@dataclass(frozen=True)
class PeakLookup:
    tflops: float | None
    source: str | None
    reason: str | None
    """Why `tflops` is None."""


def match_device(device_name: str) -> Optional[DevicePeak]:
    """The table's entry for a device name (as torch reports it, or a system profile's `accelerator`)."""
    return next((p for p in PEAKS if device_name and re.search(p.pattern, device_name, flags=re.IGNORECASE)), None)


def lookup_peak(device_name: str, precision: str) -> PeakLookup:
    """The dense peak of `device_name` for `precision` (fp32 | fp16 | bf16)."""
    peak = match_device(device_name)
    if peak is not None:
        value = peak.tflops.get(precision)
        if value is None:
            return PeakLookup(None, None, f"{peak.name} has no dense {precision} peak in the table ({peak.source})")
        return PeakLookup(value, peak.source, None)
    return PeakLookup(
        None,
        None,
        f"no dense {precision} peak is known for device '{device_name}'; "
        "give a measured one with system.peak_tflops and system.peak_tflops_source",
    )


GENERIC_GEMM_EFFICIENCY = 0.7
"""For a device with no measured large-GEMM efficiency: run `harness calibrate` on it instead."""


def gemm_efficiency(system: object) -> float:
    """The large-GEMM efficiency a system profile gets: the profile's own figure (`harness calibrate`, or a
    measurement its author cites), else the device's published measurement (its `gemm_source`), else a generic
    figure."""
    value = getattr(system, "gemm_efficiency", None)
    if value is not None:
        return float(value)
    peak = device_entry(system)
    return peak.gemm_efficiency if peak is not None and peak.gemm_efficiency is not None else GENERIC_GEMM_EFFICIENCY


def device_entry(system: object) -> Optional[DevicePeak]:
    return match_device(getattr(system, "accelerator", None) or "")
