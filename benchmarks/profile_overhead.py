"""What profiling costs: `harness run` with `profile.enabled=true` against the same run without it.

Three figures per model (2 local ranks, DDP, fp32, CPU):
- on the profiled steps: the recorded steps' median time against the same steps of a run with profiling
  off (the same step indices: early steps run slower than late ones); summary.json's own
  `profile.overhead_pct` (recorded steps against the same run's unprofiled ones) is reported beside it;
- on the rest of the run: the profiled run's unprofiled timed steps against the same steps of the run
  without profiling (run-to-run noise on a small shared host is of the same order; the JSON has every
  round's medians);
- after the loop: the seconds the slowest rank takes to write and to analyse its trace (outside every step).
The arms alternate in ABBA order in fresh subprocesses. Step times of separate processes on a small shared
host drift by more than the effects measured (tens of percent between rounds), so two figures are also
measured where that drift cannot reach them: the in-run ratio summary.json reports (recorded steps against
the same run's unprofiled steps, seconds apart), and the one cost profiling leaves in every step of every
run, the phase markers (`record_function` with no profiler active), timed in-process and divided by the
step time as a bound on the rest-of-run overhead. Writes JSON
(default results/profile_overhead.json).

    python benchmarks/profile_overhead.py [--rounds 2] [--steps 16] [--models gpt-tiny gpt-20m]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, ContextManager

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import MODELS, model_overrides  # noqa: E402

PROFILE = ["profile.enabled=true", "profile.warmup=1", "profile.active=3"]
MARKERS_PER_STEP = 5


def run(name: str, steps: int, warmup: int, profiled: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The step records and the summary (with the traces' total size) of one 2-rank `harness run` in a fresh
    subprocess."""
    dims = MODELS[name]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "harness.cli", "run", f"hydra.run.dir={run_dir}", *model_overrides(name, dims),
               "launcher.nproc=2", "launcher.omp_num_threads=1", "train.precision=fp32",
               f"train.micro_batch_size={dims['batch']}", f"train.steps={steps}", f"train.warmup_steps={warmup}",
               *(PROFILE if profiled else [])]
        subprocess.run(cmd, cwd=tmp, check=True, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        steps_out = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
        summary = json.loads((run_dir / "summary.json").read_text())
        summary["trace_bytes"] = sum(p.stat().st_size for p in run_dir.glob("profile/*.json.gz"))
        return steps_out, summary


def median_ms(steps: list[dict[str, Any]], indices: set[int]) -> float:
    return statistics.median(s["iter_time_ms"] for s in steps if s["step"] in indices)


def marker_cost_us(marker: Callable[[str], ContextManager[Any]], calls: int = 200_000) -> float:
    """CPU time of entering and leaving one phase marker with no profiler running, in µs (thread CPU time,
    so neighbours on a shared host do not inflate it)."""
    import time

    for _ in range(1000):
        with marker("harness.forward"):
            pass
    start = time.thread_time()
    for _ in range(calls):
        with marker("harness.forward"):
            pass
    return (time.thread_time() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--note", default="", help="how quiet the host was, for the record")
    parser.add_argument("--out", default=str(ROOT / "results" / "profile_overhead.json"))
    args = parser.parse_args()
    results: dict[str, Any] = {}
    from torch.profiler import record_function

    from harness.trace.capture import phase

    marker_us, record_function_us = marker_cost_us(phase), marker_cost_us(record_function)
    print(f"one phase marker with no profiler running: {marker_us:.2f} µs (record_function alone: "
          f"{record_function_us:.2f} µs)", flush=True)
    for name in args.models:
        rounds = []
        for i in range(args.rounds):
            order = (False, True) if i % 2 == 0 else (True, False)  # ABBA
            arms = {profiled: run(name, args.steps, args.warmup, profiled) for profiled in order}
            (off_steps, _), (on_steps, on_summary) = arms[False], arms[True]
            profile, breakdown = on_summary["profile"], on_summary["breakdown"]
            recorded = {s["step"] for s in on_steps if s.get("profiler") == "record"}
            rest = {s["step"] for s in on_steps if not s["warmup"] and not s.get("profiler")}
            rounds.append({  # the same step indices in both arms: early steps run slower than late ones
                "off_recorded_steps_median_ms": median_ms(off_steps, recorded),
                "on_recorded_steps_median_ms": median_ms(on_steps, recorded),
                "off_rest_median_ms": median_ms(off_steps, rest),
                "on_rest_median_ms": median_ms(on_steps, rest),
                "summary_overhead_pct": profile["overhead_pct"],
                "export_s": profile["export_s"], "analyse_s": profile["analyse_s"],
                "traced_step_ms": breakdown["step_ms"],
                "trace_bytes_all_ranks": on_summary["trace_bytes"],
            })
        def ratio(on: str, off: str) -> float:
            return 100 * (statistics.median(r[on] for r in rounds) / statistics.median(r[off] for r in rounds) - 1)

        results[name] = {
            "dims": MODELS[name], "rounds": rounds,
            "profiled_steps_overhead_pct": ratio("on_recorded_steps_median_ms", "off_recorded_steps_median_ms"),
            "rest_of_run_overhead_pct": ratio("on_rest_median_ms", "off_rest_median_ms"),
            "summary_overhead_pct": statistics.median(r["summary_overhead_pct"] for r in rounds),
            "export_s": statistics.median(r["export_s"] for r in rounds),
            "analyse_s": statistics.median(r["analyse_s"] for r in rounds),
            "trace_mb_per_rank": statistics.median(r["trace_bytes_all_ranks"] for r in rounds) / 2 / 1e6,
            # forward + backward per micro-batch, optimizer, data and metrics per step (DDP, 1 micro-batch)
            "markers_per_step": MARKERS_PER_STEP,
            "marker_bound_pct": 100 * MARKERS_PER_STEP * marker_us / 1e3
            / statistics.median(r["on_rest_median_ms"] for r in rounds),
        }
        print(f"{name}: profiled steps {results[name]['profiled_steps_overhead_pct']:+.1f}% (summary "
              f"{results[name]['summary_overhead_pct']:+.1f}%), rest of run "
              f"{results[name]['rest_of_run_overhead_pct']:+.1f}% (markers bound "
              f"{results[name]['marker_bound_pct']:.3f}%), export {results[name]['export_s']:.2f} s, "
              f"analysis {results[name]['analyse_s']:.2f} s", flush=True)
    out = {
        "benchmark": "harness run (2 ranks, ddp, fp32, CPU, gloo) with profile.enabled=true (profiler warm-up 1 "
                     "step, 3 recorded) vs without; medians of step times",
        "command": "benchmarks/profile_overhead.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "note": args.note},
        "steps_per_run": args.steps, "warmup_steps": args.warmup,
        "marker_cost_us": marker_us,
        "record_function_idle_cost_us": record_function_us,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
