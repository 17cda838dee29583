"""Dense peak throughput per device, each with its source.

An unknown device gets no peak (MFU `null` with the reason), never another device's peak: that
fallback is how torchtitan once reported 152% MFU. A system config may supply a measured peak.
Sparsity figures from datasheets are halved to their dense values here. Compute units: the vendors'
architecture whitepapers (A100 108 SMs, H100 SXM/H200 132, H100 PCIe 114, V100 80; MI250X 110 CUs per GCD,
MI300X 304).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class GemmShape:
    """How a GEMM's shape sets its rate on a device: the output tiles its library chooses among (rows, columns,
    rate relative to the first), each filling the SMs/CUs in waves (a partial tile and a partial last wave compute
    for nothing), and a fixed cost per tile beside its loop over the inner dimension, as so many inner elements."""

    tiles: tuple[tuple[int, int, float], ...] = ((256, 128, 1.0),)
    inner_overhead: float = 0.0
    reference: Optional[int] = None
    """The square GEMM the device's gemm_efficiency was measured at, where the model gives that rate exactly;
    None: the rate is taken as a large GEMM's before its tiles and inner cost."""


@dataclass(frozen=True)
class DevicePeak:
    name: str
    pattern: str
    """Regular expression matched (case-insensitive) against the device name torch reports."""
    tflops: dict[str, float | None]
    """Dense TFLOP/s per precision: bf16 and fp16 tensor-core math, fp32 without TF32."""
    source: str
    gemm_efficiency: Optional[float] = None
    """Fraction of the dense 16-bit peak a regular large 16-bit GEMM reaches through PyTorch's default GEMM path,
    measured (None: not known): the best mean rate of a regular sweep of sizes (SWEEP), not the best shape of an
    exhaustive search (MAMF), which sits 8% above it on A100 and 42% on MI250X; on H100 and H200 the best shape's
    rate, which a regular square GEMM through cuBLAS's default algorithm reaches at 8192^3 (docs/costmodel.md)."""
    gemm_source: Optional[str] = None
    gemm_precision_ratio: dict[str, float] = field(default_factory=dict)
    """A GEMM's rate in another 16-bit dtype relative to the one gemm_efficiency was measured in, where the
    vendor's library runs them at different rates on the same tensor cores (precision: ratio; absent: 1)."""
    gemm_precision_source: Optional[str] = None
    compute_units: Optional[int] = None
    """Streaming multiprocessors (NVIDIA) or compute units (AMD, per GCD) that a GEMM's tiles fill in waves."""
    hbm_efficiency: Optional[float] = None
    """Fraction of the datasheet memory bandwidth a streaming kernel reaches (STREAM triad), measured."""
    hbm_source: Optional[str] = None
    attention: "AttentionTable" = ()
    """FlashAttention-2's forward + backward TFLOP/s, measured: (head dim, causal, ((sequence length, TFLOP/s),
    ...)), FLOPs counted as FlashAttention's benchmark counts them (forward 4·b·s²·heads·d, halved when causal;
    backward 2.5 times that)."""
    attention_source: Optional[str] = None
    kernel_startup_us: Optional[float] = None
    """Device time one kernel costs beyond its bytes when kernels run back to back on a stream (the device taking
    the launch, the ramp-up of its first blocks and the drain of its last wave), measured (None: not known)."""
    kernel_startup_source: Optional[str] = None
    gemm_shape: GemmShape = GemmShape()
    """Tiles and inner-dimension cost, measured where a sweep of shapes exists; otherwise one 256×128 tile and no
    inner-dimension term (NVIDIA's 'Matrix Multiplication Background User's Guide' example)."""
    gemm_shape_source: Optional[str] = None
    cudnn_attention: "AttentionTable" = ()
    """cuDNN's fused attention, forward + backward (the table of `attention`): what PyTorch's SDPA runs on Hopper
    where it prefers cuDNN (Software.attention_kernel); () where not measured, and FlashAttention-2's stands."""
    cudnn_attention_source: Optional[str] = None
    sustained_gemm: Optional["SustainedGemm"] = None
    """A large GEMM's rate held at the device's power limit, measured (None: not known); where it falls below the
    rate gemm_efficiency and gemm_shape give the same GEMM, which short benchmarks measure, every GEMM is priced at
    that share of its rate (timing.sustained_share)."""
    sustained_source: Optional[str] = None


@dataclass(frozen=True)
class SustainedGemm:
    """A square GEMM timed over enough back-to-back calls that the device runs at its power limit, as a training
    step's GEMMs do: a GPU drops its clock there, below where a short burst of calls runs."""

    size: int
    tflops: float
    precision: str = "bf16"


MAMF = ("Maximum Achievable Matmul FLOPS (mean of 100 runs after 50 warm-up, best shape), S. Bekman, "
        "github.com/stas00/ml-engineering compute/accelerator/README.md")
SWEEP = ("torch.mm in fp16, mean of 100 runs after 50 warm-up, M = N = 32 ... 8192 at K = 4096: EleutherAI's "
         "transformer-sizing GEMM benchmark, EleutherAI/cookbook sizing/benchmarks/mm_flops.py and "
         "sizing/results/gemm_data/mm/m_sweep/{file} at 27dff48 (committed 2023-12-25)")
STREAM = ("STREAM-style triad (2 loads, 1 store), best over occupancy, te42kyfo/gpu-benches gpu-stream/{file} at "
          "1c36d50 (D. Ernst)")
SMALL_KERNELS = ("a scaling kernel (A = 0.25 B) launched back to back on one stream, 2,000-30,000 times per size, each "
                 "device's time per kernel fitted as T = a + V/b over L2-resident volumes up to 3-31 MB: "
                 "te42kyfo/gpu-benches gpu-small-kernels/repeated-stream.svg at 1c36d50 (D. Ernst; the fit's a). "
                 "Launched as a CUDA graph the same kernels take 1.2-1.8 us less at every size, kernels of up to "
                 "230 us included, where the host is far ahead: a is the device's cost of a launch in stream order")
FA2 = ("FlashAttention-2 forward + backward, bf16, batch x heads fixed at 16k tokens, Dao-AILab/flash-attention "
       "assets/flash2_{device}_fwd_bwd_benchmark.png at 0251105 (the README's 'Speedup' figures)")
SEQ = (512, 1024, 2048, 4096, 8192, 16384)
AttentionTable = tuple[tuple[int, bool, tuple[tuple[int, float], ...]], ...]
A100_FA2 = ((64, True, tuple(zip(SEQ, (88, 119, 140, 156, 165, 171)))),
            (128, True, tuple(zip(SEQ, (99, 133, 155, 173, 182, 189)))),
            (64, False, tuple(zip(SEQ, (132, 153, 162, 171, 175, 176)))),
            (128, False, tuple(zip(SEQ, (151, 173, 187, 196, 201, 203)))))
H100_FA2 = ((64, True, tuple(zip(SEQ, (141, 192, 232, 257, 273, 284)))),
            (128, True, tuple(zip(SEQ, (163, 221, 265, 294, 308, 328)))),
            (64, False, tuple(zip(SEQ, (215, 254, 274, 288, 294, 296)))),
            (128, False, tuple(zip(SEQ, (248, 294, 320, 326, 335, 338)))))

KEMPNER_MATMUL = ("torch.matmul of two {n}x{n} {dtype} matrices, 50 calls timed back to back after 10 warm-up calls "
                  "and after the same size's TF32 and FP16 runs, seconds of continuous load: gpu_bench.py in the "
                  "Kempner Institute's 'Which Kempner Partition Should Your Job Run On?' (Shad and Mazloumi, 2026; "
                  "KempnerInstitute/kempner-computing-handbook kempner_computing_handbook/technical_blog/"
                  "choosing_gpu_partition.md at c8d6760), PyTorch 2.8, CUDA 12.8: {figure}")
HOPPER_SUSTAINED = (
    "The gap to the rates above (the best shape of an exhaustive search, 150 calls per shape; fast.cu's 8 calls of "
    "8192^3) is where a Hopper GPU settles under continuous load: its clock falls as it reaches its power limit, so "
    "a GEMM's rate drifts down over a run of calls to a steady state (triton-lang/triton pull 4493: 'H100s have a "
    "power throttling depending on the kernel'; the same search read 813 TFLOP/s on an H100 with no warm-up, which "
    "its author rejected as not sustainable: stas00/ml-engineering pull 59). Another site agrees with these GPUs' "
    "level: Azure's cuBLASLt GEMM after 10,000 warm-up calls read 1,377 TFLOP/s in FP8 at 16384^3 on an ND H100 v5 "
    "(Azure/AI-benchmarking-guide Azure_Results/ND_H100_v5_results.md at ae0b6a7), where Kempner's read 1,339. "
    "Measured on the SXM part at its 700 W limit; a GH200 or an H100 NVL, which this entry also matches, has "
    "another limit and no measurement of its own. A step that stays below the limit holds more: KempnerForge's 175B "
    "run on 360 H200 drew 619 W at an SM clock of 1,840 MHz (KempnerInstitute/KempnerForge benchmarks/175b_360gpu/"
    "README.md at b62d2e3); the model does not predict a step's power, so it applies the share to every step")

FA3_FORWARD = ("forward alone, fp16, on an H100 80GB SXM5, in FlashAttention-3's benchmark figure (Shah et al. 2024, "
               "'FlashAttention-3: Fast and Accurate Attention with Asynchrony and Low-precision', arXiv 2407.08608; "
               "Dao-AILab/flash-attention assets/flash3_fp16_fwd.png at 7ef2484), which times FlashAttention-2 and "
               "cuDNN side by side")
H100_FA2_FORWARD = ((64, True, tuple(zip(SEQ, (180, 229, 262, 284, 295, 299)))),
                    (128, True, tuple(zip(SEQ, (191, 260, 298, 319, 333, 335)))),
                    (256, True, tuple(zip(SEQ, (208, 251, 278, 293, 297, 298)))),
                    (64, False, tuple(zip(SEQ, (282, 306, 318, 321, 322, 324)))),
                    (128, False, tuple(zip(SEQ, (309, 350, 362, 368, 370, 370)))),
                    (256, False, tuple(zip(SEQ, (275, 313, 321, 323, 324, 326)))))
H100_CUDNN_FORWARD = ((64, True, tuple(zip(SEQ, (225, 288, 334, 363, 379, 388)))),
                      (128, True, tuple(zip(SEQ, (315, 410, 484, 518, 529, 539)))),
                      (256, True, tuple(zip(SEQ, (308, 391, 450, 483, 497, 509)))),
                      (64, False, tuple(zip(SEQ, (335, 373, 395, 408, 412, 413)))),
                      (128, False, tuple(zip(SEQ, (497, 574, 617, 609, 600, 595)))),
                      (256, False, tuple(zip(SEQ, (470, 546, 580, 581, 580, 581)))))


def scaled_attention(table: AttentionTable, target: AttentionTable, reference: AttentionTable) -> AttentionTable:
    """`table`'s rates times target/reference at the same head dim, mask and length: another kernel's forward +
    backward from its forward's ratio (`target`) to that of the kernel `table` measured (`reference`)."""
    def rates(t: AttentionTable) -> dict[tuple[int, bool, int], float]:
        return {(d, c, n): r for d, c, points in t for n, r in points}

    up, down = rates(target), rates(reference)
    return tuple((d, c, tuple((n, r * up[d, c, n] / down[d, c, n]) for n, r in points)) for d, c, points in table)


H100_CUDNN = scaled_attention(H100_FA2, H100_CUDNN_FORWARD, H100_FA2_FORWARD)
CUDNN_SOURCE = (f"cuDNN's fused attention, forward + backward: FlashAttention-2's ({FA2.format(device='h100')}) times "
                f"cuDNN's forward over FlashAttention-2's, both {FA3_FORWARD} (1.6x at head dim 128 and 4k, causal; "
                "1.3x at head dim 64); the backward taken at the forward's ratio (the paper's backward figure is not "
                "among flash-attention's assets)")

XLA_SM90 = ("XLA's autotuned bf16 GEMM table for sm_90 (xla/service/gpu/model/matmul_interpolator_data.h in ROCm/xla "
            "at d02afb4: 375 shapes, batch 1-4, M, N, K 256-4096)")
HOPPER_GEMM_SHAPE = GemmShape(tiles=((256, 128, 1.0), (128, 256, 1.0), (128, 128, 0.8), (128, 64, 0.6),
                                     (64, 128, 0.6)), inner_overhead=280.0, reference=8192)
HOPPER_GEMM_SHAPE_SOURCE = (
    f"{XLA_SM90}: with the tiles 256x128, 128x128 at 0.8 and 128x64 at 0.6 of the large tile's rate (either way "
    "round), the best chosen, and 280 inner elements of fixed cost per tile, the model reads its 81 shapes with M, "
    "N, K >= 1024 within 5.1% on average (17% at worst) where one 256x128 tile and no inner term read 13.8% (64%); "
    "at K = 256-512 it reads 13% on average (25% at worst). A 1024x2048 output at K = 4096 runs at 666 TFLOP/s, "
    "more than one wave of 64 large tiles on 132 SMs allows, and 4096x4096 outputs fall from 780 at K = 4096 to "
    "552 at K = 512. Held to the measured rate at 8192^3, the model reads 826 at 12288^3, where fast.cu's cuBLAS "
    "run measured 823")

# Order matters: more specific names first (H100 PCIe before H100).
PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak("V100-PCIe", r"V100.*PCIE", {"fp16": 112.0, "bf16": None, "fp32": 14.0},
               "NVIDIA V100 datasheet (PCIe): 112 TFLOP/s fp16 tensor, 14 fp32; no bf16 tensor cores",
               compute_units=80),
    DevicePeak("V100-SXM2", r"V100", {"fp16": 125.0, "bf16": None, "fp32": 15.7},
               "NVIDIA V100 datasheet (SXM2): 125 TFLOP/s fp16 tensor, 15.7 fp32; no bf16 tensor cores",
               0.708, SWEEP.format(file="v100.out") + ": 88.5 of 125 TFLOP/s at 8192x4096x8192, its best",
               compute_units=80, hbm_efficiency=0.90, hbm_source=STREAM.format(file="v100.txt") + ": 814 of 900 GB/s"),
    DevicePeak("A100", r"A100", {"fp16": 312.0, "bf16": 312.0, "fp32": 19.5},
               "NVIDIA A100 datasheet: 312 TFLOP/s bf16/fp16 dense, 19.5 fp32",
               0.806, SWEEP.format(file="a100.out") + ": 251.5 of 312 TFLOP/s at 8192x4096x8192, its best; "
               f"the best shape of an exhaustive search reaches 271.2 ({MAMF} at 744d01e)",
               compute_units=108, hbm_efficiency=0.87,
               hbm_source=STREAM.format(file="a100_40.txt, a100_80.txt") + ": 1375 of 1555 and 1759 of 2039 GB/s",
               attention=A100_FA2, attention_source=FA2.format(device="a100"),
               kernel_startup_us=2.555, kernel_startup_source=f"{SMALL_KERNELS}: 2,555 ns on the A100 80GB",
               sustained_gemm=SustainedGemm(16384, 267.0),
               sustained_source=KEMPNER_MATMUL.format(n=16384, dtype="bf16", figure="267 TFLOP/s on an A100 40GB, "
                                                      "above what the sweep's rate gives the same GEMM, so it lowers "
                                                      "nothing")),
    DevicePeak("H100-PCIe", r"H100.*PCIE", {"fp16": 756.0, "bf16": 756.0, "fp32": 51.0},
               "NVIDIA H100 datasheet (PCIe): 1513 with sparsity = 756 dense bf16/fp16, 51 fp32",
               compute_units=114, hbm_efficiency=0.92,
               hbm_source=STREAM.format(file="h100_pcie.txt") + ": 1832 of ~2000 GB/s"),
    DevicePeak("H100-SXM", r"H100|GH200", {"fp16": 989.0, "bf16": 989.0, "fp32": 67.0},
               "NVIDIA H100 datasheet (SXM): 1979 with sparsity = 989 dense bf16/fp16, 67 fp32",
               0.803, f"{MAMF} at 744d01e: H100 SXM 794.5 of 989 TFLOP/s, which a regular square GEMM through "
               "cuBLAS's default algorithm reaches at 8192^3 (797.8 TFLOP/s, bf16, mean of 8 after a warm-up; "
               "716-741 at 4096^3-6144^3, 823 at 12288^3: pranjalssh/fast.cu README.md at a1bb7b2 and af9ce16, "
               "logs.txt at a3d3dba), as does XLA's autotuned bf16 table for sm_90 (xla/service/gpu/model/"
               "matmul_interpolator_data.h in ROCm/xla at d02afb4: 780.2 at 4096^3, 804.7 at its best)",
               compute_units=132, hbm_efficiency=0.89,
               hbm_source="BabelStream triad on an Azure ND H100 v5 (H100 80GB HBM3, the SXM part): 2.97 of 3.35 TB/s "
               "(Azure/AI-benchmarking-guide Azure_Results/ND_H100_v5_results.md at ae0b6a7); the same benchmark "
               "reads 1.70 of 2.04 TB/s on the A100 80GB, where gpu-stream (the A100's, V100's and MI250X's source) "
               "reads 1.76: Hopper's figures may sit about 3% below the others' basis",
               attention=H100_FA2, attention_source=FA2.format(device="h100"),
               cudnn_attention=H100_CUDNN, cudnn_attention_source=CUDNN_SOURCE,
               kernel_startup_us=2.433, kernel_startup_source=f"{SMALL_KERNELS}: 2,433 ns on the H200, the same "
               "GH100 die and SMs",
               gemm_shape=HOPPER_GEMM_SHAPE, gemm_shape_source=HOPPER_GEMM_SHAPE_SOURCE,
               sustained_gemm=SustainedGemm(16384, 710.0),
               sustained_source=KEMPNER_MATMUL.format(n=16384, dtype="bf16", figure="710 +- 14 TFLOP/s on an H100 "
                                                      "80GB") + ". " + HOPPER_SUSTAINED),
    DevicePeak("H200", r"H200", {"fp16": 989.0, "bf16": 989.0, "fp32": 67.0},
               "NVIDIA H200 datasheet (SXM): 1979 with sparsity = 989 dense bf16/fp16, 67 fp32",
               0.803, f"{MAMF} at 744d01e: H100 SXM 794.5 of 989 TFLOP/s, 'H200 is the same'",
               compute_units=132, hbm_efficiency=0.865,
               hbm_source="BabelStream triad on an Azure ND H200 v5 (the SXM part): 4.15 of 4.8 TB/s "
               "(Azure/AI-benchmarking-guide Azure_Results/ND_H200_v5_results.md at 7f20e5f), the benchmark that "
               "measured the H100 SXM; gpu-stream's H200 (h200.txt at 1c36d50) reads 3.53, but its write stream "
               "tops out at 81% of the datasheet there, against 93-101% on every other device it measured, so that "
               "card's memory did not run at the SXM part's rate",
               attention=H100_FA2, attention_source=FA2.format(device="h100") + " (the H100's: the same SMs)",
               cudnn_attention=H100_CUDNN, cudnn_attention_source=CUDNN_SOURCE + " (the H100's: the same SMs)",
               kernel_startup_us=2.433, kernel_startup_source=f"{SMALL_KERNELS}: 2,433 ns",
               gemm_shape=HOPPER_GEMM_SHAPE, gemm_shape_source=HOPPER_GEMM_SHAPE_SOURCE + " (the H100's: the same "
               "SMs and library)",
               sustained_gemm=SustainedGemm(16384, 696.0),
               sustained_source=KEMPNER_MATMUL.format(n=16384, dtype="bf16", figure="696 +- 5 TFLOP/s on an H200 "
                                                      "141GB") + ". " + HOPPER_SUSTAINED),
    DevicePeak("MI250X-GCD", r"MI250X?", {"fp16": 191.5, "bf16": 191.5, "fp32": 23.95},
               "AMD Instinct MI250X datasheet: 383 TFLOP/s fp16/bf16 and 47.9 fp32 vector per OAM; "
               "torch sees each of its two GCDs as a device, so half per GCD",
               0.542, SWEEP.format(file="mi250x.out") + " on one GCD: 103.8 of 191.5 TFLOP/s at 4096^3, its best "
               "(97.1 at 8192x4096x8192); the best shape of an exhaustive search reaches 147.0 under ROCm 6.2 "
               f"({MAMF} at 37d41a7, row removed in 7376725), as do HPL-MxP's large trailing-matrix GEMMs with every "
               "GCD busy (146.8 per GCD, at-aaims/OpenMxP doc/crusher_example_32x32.out, steps 10-150)",
               gemm_precision_ratio={"bf16": 0.856},
               gemm_precision_source="rocBLAS's tuned GEMM kernels for gfx90a (ROCm/rocBLAS at rocm-5.2.0, 4a92c6f, "
               "library/src/blas3/Tensile/Logic/asm_full/aldebaran_Cijk_{Ailk_Bljk,Ailk_Bjlk,Alik_Bljk}_{BBH,HBH}"
               ".yaml: the efficiency Tensile measured for each size it tuned): bf16 over fp16 at the same size and "
               "layout, median 0.856 (quartiles 0.852-0.862) over the 196 sizes with M, N, K >= 2048 that both "
               "dtypes tuned in the NN, NT and TN layouts (4096^3 NN: 75.7% against 87.8%); unchanged through "
               "rocm-5.7.0, so measured on ROCm 5's rocBLAS, not ROCm 6's hipBLASLt; the sweep above is fp16",
               compute_units=110, hbm_efficiency=0.80,
               hbm_source=STREAM.format(file="mi210.txt") + ": 1305 of 1638 GB/s on the MI210, one CDNA2 die with "
               "the same HBM2e as an MI250X GCD",
               kernel_startup_us=1.956, kernel_startup_source=f"{SMALL_KERNELS}: 1,956 ns on the MI210, one CDNA2 "
               "die like an MI250X GCD"),
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
            known = ", ".join(sorted(k for k, v in peak.tflops.items() if v is not None))
            return PeakLookup(None, None, f"{peak.name} has no dense {precision} peak in the table ({peak.source}): "
                                          f"set train.precision to one it has ({known}), or give a measured one "
                                          "with system.peak_tflops and system.peak_tflops_source")
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


def gemm_precision_ratios(system: object) -> tuple[tuple[str, float], ...]:
    """A GEMM's rate in each dtype the device's entry names relative to the dtype its GEMM efficiency was measured
    in (`DevicePeak.gemm_precision_ratio`); none where the profile states its own efficiency (`harness calibrate`
    measures in the run's dtype) or the device's library runs every dtype alike."""
    peak = device_entry(system)
    if getattr(system, "gemm_efficiency", None) is not None or peak is None:
        return ()
    return tuple(sorted(peak.gemm_precision_ratio.items()))


def gemm_shape(system: object) -> GemmShape:
    """The tiles and inner-dimension cost a GEMM's rate follows (`DevicePeak.gemm_shape`): the device's; where the
    profile states its own efficiency (`harness calibrate`, a site's measurement) the library's tiles, but no
    inner-dimension term and no reference shape, which belong to the device's published rate."""
    peak = device_entry(system)
    if peak is None:
        return GemmShape()
    if getattr(system, "gemm_efficiency", None) is not None:
        return GemmShape(tiles=peak.gemm_shape.tiles)
    return peak.gemm_shape


def device_entry(system: object) -> Optional[DevicePeak]:
    return match_device(getattr(system, "accelerator", None) or "")


GENERIC_MEMORY_EFFICIENCY = 0.8
"""For a device with no measured streaming bandwidth: run `harness calibrate` on it instead."""


def memory_efficiency(system: object) -> float:
    """The fraction of the datasheet memory bandwidth a streaming kernel gets: the profile's own figure, else the
    device's published measurement (its `hbm_source`), else a generic figure."""
    value = getattr(system, "memory_efficiency", None)
    if value is not None:
        return float(value)
    peak = device_entry(system)
    return peak.hbm_efficiency if peak is not None and peak.hbm_efficiency is not None else GENERIC_MEMORY_EFFICIENCY


GENERIC_KERNEL_STARTUP_US = 2.4
"""For a GPU with no measured kernel startup: the median of the five GPUs SMALL_KERNELS measured (L40 1.6 µs,
MI210 2.0, H200 2.4, A100 2.6, RX 6900 XT 2.6)."""


def kernel_startup_us(system: object) -> float:
    """Device time per kernel beyond its work, back to back on a stream: the profile's own figure, else the
    device's published measurement (its `kernel_startup_source`), else a generic figure; 0 on a CPU, whose
    operators run as calls on the host (layer_overhead_us holds their cost)."""
    if getattr(system, "device", "cuda") == "cpu":
        return 0.0
    value = getattr(system, "kernel_startup_us", None)
    if value is not None:
        return float(value)
    peak = device_entry(system)
    return (peak.kernel_startup_us if peak is not None and peak.kernel_startup_us is not None
            else GENERIC_KERNEL_STARTUP_US)


def attention_rate(table: AttentionTable, head_dim: int, causal: bool, seq_len: int) -> Optional[float]:
    """A fused attention kernel's measured forward + backward TFLOP/s for this shape (the nearest head dimension
    measured, interpolated in log(sequence length), held at the ends); None where the device has no measurement."""
    dims = [(abs(d - head_dim), d) for d, c, _ in table if c == causal]
    if not dims:
        return None
    nearest = min(dims)[1]
    points = next(p for d, c, p in table if d == nearest and c == causal)
    if seq_len <= points[0][0]:
        return points[0][1]
    for (s0, r0), (s1, r1) in zip(points, points[1:]):
        if seq_len <= s1:
            w = (math.log(seq_len) - math.log(s0)) / (math.log(s1) - math.log(s0))
            return r0 + w * (r1 - r0)
    return points[-1][1]
