"""One rank's trace into its breakdown (on that rank, after the loop), and every rank's into summary.json.

Each rank analyses its own trace, so the breakdown needs no shared filesystem and costs one rank's
time, in parallel; rank 0 gathers the results with the other end-of-run reports and writes:
- `breakdown`: per step, the mean over ranks of compute, communication, overlap, exposed communication
  and idle time (memory copies on a GPU), the phases the backends mark, communication by collective
  kind with the cost model's bytes beside the measured ones, HTA's top kernels, and every rank's row;
- `profile`: the window, the trace files, the memory snapshots, and what profiling cost: the recorded
  steps' median time against the unprofiled timed steps', and the slowest rank's seconds to write and
  to analyse its trace after the loop (outside every step).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Optional

from harness.telemetry.summary import timed_steps
from harness.trace import comm, cpu, gpu
from harness.trace.capture import TraceCapture
from harness.trace.events import load, phases_ms

SPLIT = ("step_ms", "compute_ms", "comm_ms", "overlap_ms", "exposed_comm_ms", "memcpy_ms", "idle_ms")
CPU_SOURCE = "cpu operators (harness.trace.cpu: no accelerator kernels in the trace)"
HTA_SOURCE = "Holistic Trace Analysis (GPU kernels)"


def _mean(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Key-wise mean of numeric values (nested dicts too), over the rows that have the key."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for row in rows for k in row):
        values = [row[key] for row in rows if key in row and row[key] is not None]
        if values and all(isinstance(v, dict) for v in values):
            out[key] = _mean(values)
        elif values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = statistics.fmean(values)
    return out


ANALYSIS_SHARE = 0.5
"""Of `launcher.pg_timeout_s`, the time one rank may spend analysing its trace: every rank then meets in the
end-of-run gather, which waits for the slowest one no longer than that timeout."""


def analyse_trace(path: Path, rank: int, steps: Optional[range] = None, timeout_s: float = 600.0) -> dict[str, Any]:
    """The breakdown of one rank's trace, per step (mean over `steps`, default every step in the trace)."""
    trace = load(path)
    numbers = sorted(s for s in trace.steps if steps is None or s in steps)
    if not numbers:
        raise ValueError(f"{path}: no complete recorded step (ProfilerStep#<k>) in the trace")
    windows = [trace.steps[s] for s in numbers]
    span = (windows[0][0], windows[-1][1])
    row: dict[str, Any] = {"rank": rank, "steps": numbers}
    if trace.has_kernels:
        step_ms = statistics.fmean(end - start for start, end in windows) / 1e3
        row.update(step_ms=step_ms, source=HTA_SOURCE)
        if not gpu.hta_available():
            row["reason"] = ("GPU trace not analysed: Holistic Trace Analysis is not installed "
                             "(pip install -e '.[gpu]' in the harness checkout)")
        else:
            hta = gpu.run_hta(path, rank, timeout_s)
            row.update(**gpu.hta_step_split(hta, len(numbers), step_ms),
                       comm_comp_overlap_pct=hta["comm_comp_overlap_pct"], top_kernels=hta["top_kernels"])
    else:
        per_step = cpu.step_breakdowns(trace, windows)
        row.update(_mean(per_step), source=CPU_SOURCE)
        row["per_step_ms"] = [{"step": n, "step_ms": b["step_ms"], "comm_ms": b["comm_ms"]}
                              for n, b in zip(numbers, per_step)]  # who waited for whom, step by step
    row["phases_ms"] = _mean(phases_ms(trace, windows))
    row["comm"] = {kind: {k: v / len(numbers) if k != "unsized_types" else v for k, v in entry.items()}
                   for kind, entry in comm.by_kind(trace, span).items()}
    return row


def analyse_rank(capture: TraceCapture, rank: int, pg_timeout_s: float, skip: Optional[str] = None
                 ) -> Optional[dict[str, Any]]:
    """This rank's trace written and analysed, within a share of the collective timeout (`ANALYSIS_SHARE`);
    `skip` names why not to (a wall-time stop: the job must end). A failure is reported in the summary,
    never fails the run."""
    if capture.window is None:
        return None
    if skip:
        return {"rank": rank, "error": f"trace not written: {skip}"}
    started = time.perf_counter()
    try:
        path = capture.export()
    except Exception as exc:  # noqa: BLE001 - the run's measurements stand without the trace
        return {"rank": rank, "error": f"writing the trace failed: {type(exc).__name__}: {exc}"}
    if path is None or not capture.completed:
        return {"rank": rank, "error": "the run ended before the profiler recorded a whole step"}
    exported = time.perf_counter()
    out: dict[str, Any] = {"rank": rank, "trace": str(path), "export_s": exported - started}
    if capture.dir_note:
        out["note"] = capture.dir_note
    if capture.memory_snapshot is not None:
        out["memory_snapshot"] = str(capture.memory_snapshot)
    try:
        budget = max(10.0, ANALYSIS_SHARE * pg_timeout_s - (exported - started))
        out.update(analyse_trace(path, rank, capture.completed, timeout_s=budget))
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"analysing {path} failed: {type(exc).__name__}: {exc}"
    out["analyse_s"] = time.perf_counter() - exported
    return out


def _relative(path: str, run_dir: Path) -> str:
    try:
        return str(Path(path).relative_to(run_dir.absolute()))
    except ValueError:
        return path


def summary_blocks(cfg: Any, device_type: str, ranks: list[Optional[dict[str, Any]]], steps: list[dict[str, Any]],
                   run_dir: Path, predicted: Optional[list[dict[str, Any]]]) -> dict[str, Any]:
    """summary.json's `profile` and `breakdown` blocks from every rank's analysis and the steps on disk;
    `predicted`: the cost model's collectives for this run (None: it gave none), compared kind by kind."""
    from harness.core.layout import profile_window

    train = cfg.train
    window = profile_window(cfg.profile, train.warmup_steps, train.warmup_steps + train.steps)
    if window is None:
        return {}
    rows = [r for r in ranks if r]
    recorded = [s["iter_time_ms"] for s in steps if s.get("profiler") == "record"]
    unprofiled = [s["iter_time_ms"] for s in timed_steps(steps)]
    profiled_ms = statistics.median(recorded) if recorded else None
    plain_ms = statistics.median(unprofiled) if unprofiled else None
    profile = {
        "window": {"warmup": list(window.warmup), "recorded": list(window.recorded), "stop": window.recorded.stop},
        "traces": [_relative(r["trace"], run_dir) for r in rows if r.get("trace")],
        "memory_snapshots": [_relative(r["memory_snapshot"], run_dir) for r in rows if r.get("memory_snapshot")],
        "recorded_iter_time_ms": profiled_ms,
        "unprofiled_iter_time_ms": plain_ms,
        "overhead_pct": 100 * (profiled_ms / plain_ms - 1) if profiled_ms and plain_ms else None,
        "export_s": max((r["export_s"] for r in rows if "export_s" in r), default=None),
        "analyse_s": max((r["analyse_s"] for r in rows if "analyse_s" in r), default=None),
        "errors": _grouped([(r["rank"], r["error"]) for r in rows if r.get("error")]),
        "notes": _grouped([(r["rank"], r["note"]) for r in rows if r.get("note")]),
    }
    analysed = [r for r in rows if "step_ms" in r]
    if not analysed:
        reason = "; ".join(profile["errors"]) or "no rank reported a trace"
        return {"profile": profile, "breakdown": None, "breakdown_reason": f"not measured: {reason}"}
    breakdown: dict[str, Any] = {"source": analysed[0]["source"], "steps": analysed[0]["steps"],
                                 "ranks_analysed": len(analysed)}
    kinds = {kind for r in analysed for kind in r.get("comm", {})}
    zero = {"calls": 0, "bytes": 0.0, "time_ms": 0.0}  # a rank that issued none of a kind counts as 0 in the mean
    means = _mean([{**{k: r[k] for k in (*SPLIT, "comm_comp_overlap_pct", "phases_ms") if k in r},
                    "comm": {kind: r.get("comm", {}).get(kind, zero) for kind in kinds}} for r in analysed])
    breakdown.update(means)
    for kind, entry in breakdown.get("comm", {}).items():
        types = sorted({t for r in analysed for t in r.get("comm", {}).get(kind, {}).get("unsized_types", [])})
        if types:
            entry["unsized_types"] = types  # element types of unknown size: their bytes are missing
    breakdown["max_rank_step_ms"] = max(r["step_ms"] for r in analysed)
    breakdown["comm"] = _with_prediction(breakdown.get("comm", {}), predicted, gloo=device_type == "cpu")
    if "top_kernels" in analysed[0]:
        breakdown["top_kernels_rank0"] = analysed[0]["top_kernels"]
    if any("reason" in r for r in analysed):
        breakdown["reason"] = next(r["reason"] for r in analysed if "reason" in r)
    breakdown["ranks"] = [{k: v for k, v in r.items() if k not in ("top_kernels", "source", "steps", "export_s",
                                                                   "analyse_s")} for r in analysed]
    breakdown["straggler"] = straggler(analysed)
    return {"profile": profile, "breakdown": breakdown}


STRAGGLER_LAG = 0.05
"""A rank is a straggler when the others wait for it in their collectives, at the median, longer than this share of
the step."""


def straggler(rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The rank every other one waits for, from the traced steps: in synchronous training each rank's time inside
    collectives includes its wait for the last to arrive, so the slowest rank is the one that waits least, and the
    others' extra wait is its lag. None with fewer than 2 analysed ranks."""
    waits = {r["rank"]: r["comm_ms"] for r in rows if r.get("comm_ms") is not None}
    if len(waits) < 2:
        return None
    slowest = min(waits, key=waits.__getitem__)
    lag = statistics.median(w for rank, w in waits.items() if rank != slowest) - waits[slowest]
    step = statistics.median(r["step_ms"] for r in rows)
    out = {"rank": slowest, "lag_ms": lag, "lag_share": lag / step if step else None, "flagged": bool(
           step and lag > STRAGGLER_LAG * step), "comm_ms_by_rank": [waits[r] for r in sorted(waits)],
           "rule": f"the rank that waits least in collectives; flagged when the others' median wait exceeds its "
                   f"own by more than {STRAGGLER_LAG:.0%} of the step (traced steps)"}
    by_step: dict[int, list[float]] = {}
    for r in rows:
        for entry in r.get("per_step_ms") or []:
            by_step.setdefault(entry["step"], []).append(entry["comm_ms"])
    if by_step:  # CPU traces: each traced step's spread of waits across ranks
        out["per_step"] = [{"step": n, "ranks": len(w), "comm_ms_min": min(w), "comm_ms_median": statistics.median(w),
                            "comm_ms_max": max(w)} for n, w in sorted(by_step.items())]
    return out


def _grouped(items: list[tuple[int, str]]) -> list[str]:
    """`ranks 0, 1, 2: <message>`: one line per distinct message, not one per rank."""
    ranks: dict[str, list[int]] = {}
    for rank, message in items:
        ranks.setdefault(message, []).append(rank)
    return [f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {m}" for m, r in ranks.items()]


def _with_prediction(measured: dict[str, Any], collectives: Optional[list[dict[str, Any]]],
                     gloo: bool) -> dict[str, Any]:
    """Each collective kind's measured calls, bytes and time beside the cost model's bytes (mean over ranks)."""
    if collectives is None:
        return {**measured, "predicted_reason": "the run has no prediction (see summary.json prediction_reason)"}
    predicted = comm.predicted_bytes(collectives, gloo)
    out = {}
    for kind in dict.fromkeys([*measured, *predicted]):
        entry = dict(measured.get(kind, {"calls": 0, "bytes": 0.0, "time_ms": 0.0}))
        if kind == comm.BOOKKEEPING:  # the trainer's own reduction: no prediction to compare with
            out[kind] = entry
            continue
        entry["predicted_bytes"] = predicted.get(kind, 0.0)
        entry["bytes_error"] = ((entry["predicted_bytes"] - entry["bytes"]) / entry["bytes"]
                                if entry["bytes"] else None)
        out[kind] = entry
    return out
