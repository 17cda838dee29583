"""Holistic Trace Analysis (https://github.com/facebookresearch/HolisticTraceAnalysis) on an accelerator trace.

HTA classifies a rank's GPU kernels into computation, communication (NCCL/RCCL kernels) and memory
(memcpy/memset), and reports their overlap (`get_gpu_kernel_breakdown`), the idle time between kernels
(`get_temporal_breakdown`), the share of communication that overlaps computation
(`get_comm_comp_overlap`) and the top kernels. It runs here in a child process (`python -m
harness.trace.gpu TRACE RANK`): HTA parses through a fork-based process pool, which must not fork a rank
that holds NCCL and CUDA threads, and its memory and logging stay out of the rank.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

TOP_KERNELS = 10


def hta_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("hta") is not None


def hta_breakdown(path: Path, rank: int) -> dict[str, Any]:
    """HTA's analyses of one rank's trace, whole-trace totals in µs (every recorded step included)."""
    from hta.trace_analysis import TraceAnalysis

    analysis = TraceAnalysis(trace_files={rank: str(path.absolute())}, trace_dir=str(path.parent.absolute()),
                             include_last_profiler_step=True)
    temporal = analysis.get_temporal_breakdown(visualize=False).set_index("rank").loc[rank]
    overlap = analysis.get_comm_comp_overlap(visualize=False).set_index("rank").loc[rank]
    kinds, kernels = analysis.get_gpu_kernel_breakdown(visualize=False, num_kernels=TOP_KERNELS)
    parts = {str(row["kernel_type"]): float(row["sum"]) for _, row in kinds.iterrows()}
    kernels = kernels[kernels["rank"] == rank].sort_values("sum (us)", ascending=False)
    return {
        "temporal_us": {key: float(temporal[f"{key}_time(us)"])
                        for key in ("idle", "compute", "non_compute", "kernel")},
        "comm_comp_overlap_pct": float(overlap["comp_comm_overlap_pctg"]),
        "kernel_types_us": parts,
        "top_kernels": [{"name": short_name(str(row["name"])), "type": str(row["kernel_type"]),
                         "sum_us": float(row["sum (us)"]), "mean_us": float(row["mean (us)"])}
                        for _, row in kernels.head(TOP_KERNELS).iterrows()],
    }


def short_name(kernel: str, width: int = 120) -> str:
    """A kernel's name without its argument list (C++ templates make them kilobytes long)."""
    return kernel.split("(", 1)[0][:width]


def hta_step_split(hta: dict[str, Any], steps: int, step_ms: float) -> dict[str, float]:
    """Per-step ms from HTA's kernel-type partition (its rows are disjoint: "COMPUTATION overlapping
    COMMUNICATION" is counted in both compute and communication, once in the overlap; memcpy is memory
    alone); idle is the step's time with no kernel running. So compute − overlap + comm + memcpy + idle
    is the step."""
    parts = hta["kernel_types_us"]

    def total(*words: str) -> float:
        return sum(v for k, v in parts.items() if all(w in k for w in words)) / steps / 1e3

    busy = sum(parts.values()) / steps / 1e3
    compute, comm, overlap = total("COMPUTATION"), total("COMMUNICATION"), total("COMPUTATION", "COMMUNICATION")
    memory_only = parts.get("MEMORY", 0.0) / steps / 1e3  # memory overlapping the others is inside them
    return {"compute_ms": compute, "comm_ms": comm, "overlap_ms": overlap, "exposed_comm_ms": comm - overlap,
            "memcpy_ms": memory_only, "idle_ms": max(0.0, step_ms - busy)}


def run_hta(path: Path, rank: int, timeout_s: float) -> dict[str, Any]:
    """`hta_breakdown` in a child process, its result through a file (HTA and pandas may print to stdout);
    RuntimeError with HTA's last line when it fails, TimeoutExpired past `timeout_s`."""
    with tempfile.TemporaryDirectory(prefix="harness-hta-") as scratch:
        out = Path(scratch) / "hta.json"
        done = subprocess.run([sys.executable, "-m", "harness.trace.gpu", str(path), str(rank), str(out)],
                              capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0 or not out.exists():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"Holistic Trace Analysis failed on {path}: {last}")
        return json.loads(out.read_text())


def main(argv: list[str]) -> None:
    import logging

    logging.disable(logging.INFO)  # HTA logs every parsed file
    Path(argv[2]).write_text(json.dumps(hta_breakdown(Path(argv[0]), int(argv[1]))))


if __name__ == "__main__":
    main(sys.argv[1:])
