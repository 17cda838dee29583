"""Profiler traces and where the step time goes (harness/trace/).

- A real 2-rank FSDP run with `profile.enabled=true` (one shared run): a trace per rank, the steps the
  profiler touched marked and kept out of the medians, the breakdown's parts adding up to the traced
  step, its communication bytes per collective kind equal to the cost model's (5%), and the report's
  breakdown and comm views over it.
- Holistic Trace Analysis on real GPU traces nobody here wrote (HTA's own sample, tests/data/hta/):
  its kernel partition against an independent count of the NCCL kernels in the same file.
- The CPU fallback's interval arithmetic on a trace whose answer is known, and the window's checks.
"""

from __future__ import annotations

import gzip
import json
import statistics
from pathlib import Path

import pytest

from harness.config.checks import validate
from harness.config.compose import compose
from harness.core.errors import ConfigError
from harness.core.layout import profile_window
from harness.trace import comm, cpu
from harness.trace.events import Event, Trace, intersect, length, subtract, union
from tests.conftest import GLOBAL_BATCH, Run, harness, harness_run

HTA_DATA = Path(__file__).parent / "data" / "hta"
PROFILED = ["model=gpt-tiny", "launcher.omp_num_threads=1", "launcher.nproc=2", "backend=fsdp", *GLOBAL_BATCH,
            "train.warmup_steps=1", "train.steps=5", "profile.enabled=true"]
"""Steps 0..5: warm-up 0; the profiler warms up in 1, records 2 and 3, stops in 4; 5 is timed and unprofiled."""
STEP_TOLERANCE = 0.10
"""A traced step (ProfilerStep#k, between two profiler.step() calls) against the trainer's time for that step
(between two clock reads a few hundred µs earlier in the same loop): the same interval, shifted."""


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return harness_run(tmp_path_factory.mktemp("trace") / "fsdp-profiled", *PROFILED)


@pytest.mark.multirank
def test_every_rank_writes_a_loadable_trace_of_the_recorded_steps(profiled: Run) -> None:
    assert profiled.summary["profile"]["traces"] == ["profile/rank0.json.gz", "profile/rank1.json.gz"]
    for rank in (0, 1):
        with gzip.open(profiled.run_dir / "profile" / f"rank{rank}.json.gz", "rt") as handle:
            data = json.load(handle)
        assert data["distributedInfo"]["rank"] == rank and data["distributedInfo"]["world_size"] == 2
        steps = {e["name"] for e in data["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
        assert steps == {"ProfilerStep#2", "ProfilerStep#3"}


@pytest.mark.multirank
def test_profiled_steps_are_marked_and_left_out_of_the_medians(profiled: Run) -> None:
    marks = {s["step"]: s.get("profiler") for s in profiled.steps}
    assert marks == {0: None, 1: "warmup", 2: "record", 3: "record", 4: "stop", 5: None}
    metrics, profile = profiled.summary["metrics"], profiled.summary["profile"]
    assert metrics["timed_steps"] == 1 and metrics["iter_time_ms"] == profiled.steps[5]["iter_time_ms"]
    recorded = [s["iter_time_ms"] for s in profiled.steps if s.get("profiler") == "record"]
    assert profile["recorded_iter_time_ms"] == pytest.approx(statistics.median(recorded))
    assert profile["overhead_pct"] == pytest.approx(100 * (statistics.median(recorded) / metrics["iter_time_ms"] - 1))
    assert profile["window"] == {"warmup": [1], "recorded": [2, 3], "stop": 4}
    assert profile["errors"] == [] and profile["export_s"] > 0


@pytest.mark.multirank
def test_breakdown_parts_add_up_to_the_step(profiled: Run) -> None:
    breakdown = profiled.summary["breakdown"]
    assert breakdown["source"].startswith("cpu operators") and breakdown["ranks_analysed"] == 2
    for row in breakdown["ranks"]:
        assert row["compute_ms"] + row["exposed_comm_ms"] + row["idle_ms"] == pytest.approx(row["step_ms"], rel=1e-9)
        assert 0 < row["compute_ms"] < row["step_ms"] and 0 < row["comm_ms"] < row["step_ms"]
        assert 0 <= row["overlap_ms"] <= min(row["compute_ms"], row["comm_ms"])
        phases = row["phases_ms"]
        assert all(phases[k] > 0 for k in ("forward", "backward", "optimizer", "data", "metrics"))
        assert phases["forward"] + phases["backward"] + phases["optimizer"] < row["step_ms"]
    traced = [s["iter_time_ms"] for s in profiled.steps if s.get("profiler") == "record"]
    assert breakdown["step_ms"] == pytest.approx(statistics.fmean(traced), rel=STEP_TOLERANCE)


@pytest.mark.multirank
def test_breakdown_comm_bytes_match_the_cost_model(profiled: Run) -> None:
    by_kind = profiled.summary["breakdown"]["comm"]
    # FSDP2 on gloo: parameters all-gathered (forward and backward, each micro-batch), gradients all-reduced.
    for kind in ("all_gather", "all_reduce"):
        assert by_kind[kind]["bytes"] > 0 and by_kind[kind]["time_ms"] > 0 and by_kind[kind]["calls"] >= 1
        assert by_kind[kind]["predicted_bytes"] == pytest.approx(by_kind[kind]["bytes"], rel=0.05), by_kind
    bookkeeping = by_kind[comm.BOOKKEEPING]  # the trainer's own reduction of loss, memory, telemetry
    assert bookkeeping["calls"] == 1 and "predicted_bytes" not in bookkeeping


@pytest.mark.multirank
def test_report_breakdown_and_comm_views(profiled: Run, tmp_path: Path) -> None:
    proc = harness(["report", str(profiled.run_dir), "--out", str(tmp_path / "report")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Where the step time goes" in proc.stdout and "Communication by collective kind" in proc.stdout
    assert (tmp_path / "report" / "breakdown.png").stat().st_size > 0
    assert (tmp_path / "report" / "comm.png").stat().st_size > 0
    csv = (tmp_path / "report" / "runs.csv").read_text()
    assert "breakdown.comm.all_gather.predicted_bytes" in csv


def _nccl_kernel_ms(path: Path, start: float, end: float) -> float:
    """Independent of HTA: the union of NCCL kernels' time in [start, end), read straight from the JSON."""
    with gzip.open(path, "rt") as handle:
        events = json.load(handle)["traceEvents"]
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in events
             if e.get("cat") == "kernel" and e["name"].startswith("nccl")]
    return length(intersect(union(spans), [(start, end)])) / 1e3


@pytest.mark.parametrize("rank", [0, 1])
def test_hta_breakdown_of_a_real_gpu_trace(rank: int) -> None:
    from harness.trace.analyse import analyse_trace
    from harness.trace.events import load

    path = HTA_DATA / f"sampled_rank-{rank}.json.gz"
    row = analyse_trace(path, rank)
    trace = load(path)
    steps = sorted(trace.steps)
    assert row["source"].startswith("Holistic Trace Analysis") and row["steps"] == steps == [551, 552]
    span = (trace.steps[steps[0]][0], trace.steps[steps[-1]][1])
    # HTA's communication time (its kernel partition) is the NCCL kernels' time counted here without HTA.
    assert row["comm_ms"] == pytest.approx(_nccl_kernel_ms(path, *span) / len(steps), rel=0.01)
    # HTA's own overlap figure agrees with its kernel partition's overlap row.
    assert row["comm_comp_overlap_pct"] == pytest.approx(100 * row["overlap_ms"] / row["comm_ms"], abs=0.1)
    parts = row["compute_ms"] - row["overlap_ms"] + row["comm_ms"] + row["memcpy_ms"] + row["idle_ms"]
    assert parts == pytest.approx(row["step_ms"], rel=1e-9)
    assert row["top_kernels"][0]["name"].startswith("ncclKernel_SendRecv")
    # This NCCL runs every collective as SendRecv kernels; each goes to the kind of the marker that launched it.
    kinds = row["comm"]
    assert "send_recv" not in kinds and all(kinds[k]["time_ms"] > 0 and kinds[k]["calls"] >= 1 and kinds[k]["bytes"]
                                            for k in ("all_reduce", "all_to_all", "all_gather"))
    assert sum(k["time_ms"] for k in kinds.values()) >= row["comm_ms"] * (1 - 1e-6)  # kinds may overlap in time


def _event(name: str, cat: str, ts: float, dur: float, tid: int) -> Event:
    return Event(name, cat, ts, dur, tid)


def test_cpu_breakdown_of_a_known_trace() -> None:
    """Step 0..100 µs. Operators on the training thread at 0..40 and 50..60; a c10d call at 40..45 hands an
    all-reduce to gloo's thread (42..70); a pipeline send runs on the training thread itself (80..90, with a
    copy inside it, which is communication, not compute). Compute 50, communication |40..70| + |80..90| = 40,
    overlap 50..60 = 10, exposed 30, idle 100 − 80 = 20."""
    events = [_event("ProfilerStep#7", "user_annotation", 0, 100, 1), _event("aten::mm", "cpu_op", 0, 40, 1),
              _event("c10d::allreduce_", "cpu_op", 40, 5, 1), _event("aten::add", "cpu_op", 50, 10, 1),
              _event("gloo:all_reduce", "user_annotation", 42, 28, 2), _event("aten::copy_", "cpu_op", 44, 2, 2),
              _event("gloo:send", "user_annotation", 80, 10, 1), _event("aten::copy_", "cpu_op", 82, 3, 1)]
    trace = Trace(events, {"rank": 0}, {7: (0.0, 100.0)})
    (got,) = cpu.step_breakdowns(trace, [(0.0, 100.0)])
    assert got == pytest.approx({"step_ms": 0.1, "compute_ms": 0.05, "comm_ms": 0.04, "overlap_ms": 0.01,
                                 "exposed_comm_ms": 0.03, "idle_ms": 0.02})


def test_gpu_trace_markers_kernels_and_their_gpu_copies() -> None:
    """Kineto mirrors host ranges onto the GPU timeline (`gpu_user_annotation`): they are not steps, phases or
    collectives. A grouped NCCL kernel (`Generic`, its name says no collective) takes the kind of the marker
    whose range holds its launch (matched by correlation id); NCCL names a send `nccl:send <src>-><dst>`."""
    def launch(ts: float, correlation: int) -> Event:
        return Event("cudaLaunchKernel", "cuda_runtime", ts, 1, 1, {"correlation": correlation})

    def kernel(name: str, ts: float, dur: float, correlation: int) -> Event:
        return Event(name, "kernel", ts, dur, 7, {"correlation": correlation})

    events = [_event("ProfilerStep#3", "user_annotation", 0, 1000, 1),
              _event("ProfilerStep#3", "gpu_user_annotation", 300, 500, 7),
              Event("nccl:all_gather", "user_annotation", 10, 20, 1, {"Input Dims": [[256]], "Input type": ["float"]}),
              Event("nccl:all_gather", "gpu_user_annotation", 400, 100, 7, {}),
              launch(15, 41), kernel("ncclDevKernel_Generic_1(ncclDevKernelArgsStorage<4096ul>)", 400, 100, 41),
              Event("nccl:send 0->1", "user_annotation", 600, 10, 1,
                    {"Input Dims": [[8, 4]], "Input type": ["c10::BFloat16"]}),
              launch(605, 42), kernel("ncclDevKernel_SendRecv", 700, 50, 42),
              kernel("void gemm_kernel<float>", 100, 200, 43)]
    trace = Trace(events, {"rank": 0}, {})
    trace.steps = {3: (0.0, 1000.0)}
    got = comm.by_kind(trace, (0.0, 1000.0))
    assert got == {"all_gather": {"calls": 1, "bytes": 1024.0, "time_ms": 0.1},
                   "send_recv": {"calls": 1, "bytes": 64.0, "time_ms": 0.05}}


def test_steps_are_read_from_host_ranges_only(tmp_path: Path) -> None:
    from harness.trace.events import load

    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": [
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#5", "ts": 0, "dur": 900, "tid": 1},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "ProfilerStep#5", "ts": 400, "dur": 100, "tid": 7}]}))
    assert load(path).steps == {5: (0.0, 900.0)}


@pytest.mark.parametrize("steps_run,expected", [(2, [1]), (1, None)])
def test_a_run_stopped_inside_the_window_analyses_only_whole_recorded_steps(steps_run: int, expected: list[int] | None,
                                                                             tmp_path: Path) -> None:
    """Window: step 0 the profiler's warm-up, steps 1-2 recorded. A run that stops after step 1 analyses step 1
    alone (not the stub of step 2 the profiler had opened); one that stops after step 0 has no recorded step."""
    import torch

    from harness.trace.analyse import analyse_rank
    from harness.trace.capture import TraceCapture, phase
    from harness.trace.events import PHASES

    cfg = compose(["profile.enabled=true", "profile.steps=[1,2]", "train.warmup_steps=0", "train.steps=5"])
    capture = TraceCapture(cfg, 0, tmp_path, torch.device("cpu"))
    with capture:
        for step in range(steps_run):
            with phase(PHASES.forward):
                torch.ones(64, 64) @ torch.ones(64, 64)
            capture.step(step)
    row = analyse_rank(capture, 0, pg_timeout_s=300)
    assert row is not None
    if expected is None:
        assert row["error"] == "the run ended before the profiler recorded a whole step"
    else:
        assert row["steps"] == expected and row["phases_ms"]["forward"] > 0 and "error" not in row


def test_interval_arithmetic() -> None:
    a = union([(0, 10), (5, 15), (20, 30)])
    assert a == [(0, 15), (20, 30)]
    assert intersect(a, [(10, 25)]) == [(10, 15), (20, 25)]
    assert subtract(a, [(5, 8), (25, 40)]) == [(0, 5), (8, 15), (20, 25)]
    assert subtract(a, [(-5, 100)]) == [] and subtract(a, []) == a and subtract([(0, 10), (12, 20)], [(5, 13)]) == [
        (0, 5), (13, 20)]
    assert length(a) == 25


@pytest.mark.parametrize("name,kind", [
    ("gloo:all_reduce", "all_reduce"), ("nccl:_all_gather_base", "all_gather"),
    ("nccl:reduce_scatter_tensor_coalesced", "reduce_scatter"), ("gloo:send", "send_recv"), ("gloo:recv", None),
    ("nccl:send 0->1", "send_recv"), ("nccl:recv 1->0", None), ("nccl:all_to_all_single", "all_to_all"),
    ("nccl:_reduce_oop", "reduce"), ("gloo:gather", "gather"), ("nccl:all_reduce_barrier", "barrier"),
    ("nccl:coalesced", "other"), ("aten::mm", None)])
def test_collective_kind(name: str, kind: str) -> None:
    assert comm.collective_kind(name) == kind


@pytest.mark.parametrize("overrides,message", [
    (["profile.steps=[3,5]"], "profile.steps=[3, 5]: give consecutive steps"),
    (["profile.active=20"], "set train.steps=23 or more"),
    (["train.steps=4"], "set train.steps=5 or more"),
    (["profile.active=0"], "profile.active=0: must be at least 1"),
])
def test_window_that_does_not_fit_is_refused_in_one_line(overrides: list[str], message: str) -> None:
    cfg = compose(["profile.enabled=true", *overrides])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(cfg, 1)


def test_default_window_starts_after_warmup() -> None:
    cfg = compose(["profile.enabled=true"])
    window = profile_window(cfg.profile, cfg.train.warmup_steps, cfg.train.warmup_steps + cfg.train.steps)
    assert window is not None and list(window.warmup) == [2] and list(window.recorded) == [3, 4]
    assert [window.label(s) for s in range(7)] == [None, None, "warmup", "record", "record", "stop", None]


def test_memory_snapshot_on_cpu_is_refused_before_launch(tmp_path: Path) -> None:
    proc = harness(["run", f"hydra.run.dir={tmp_path / 'run'}", "profile.enabled=true", "profile.memory=true"],
                   cwd=tmp_path)
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    assert proc.stderr.strip().count("\n") == 0 and "profile.memory=true" in proc.stderr


def test_scaling_view_takes_the_split_from_a_trace_where_a_run_has_one() -> None:
    import pandas as pd

    from harness.report.views import _split

    traced = pd.Series({"breakdown.step_ms": 100.0, "breakdown.comm_ms": 30.0, "breakdown.compute_ms": 80.0,
                        "prediction.estimate.step_time_s": 1.0})
    assert _split(traced) == pytest.approx((0.07, 0.03, "trace"))  # all communication counted, as Cheng et al.
