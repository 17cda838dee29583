"""Calibrate from one profiled run's trace, then predict other runs on this CPU (issue: predict from a profile).

1. `harness run` the source (DDP on 2 ranks, width 256) with profile.enabled=true;
2. `harness calibrate --from=<its directory>`: GEMM, attention, memory and collective rates and the per-block
   host time learned from its trace (harness/predict/fromtrace.py);
3. `harness calibrate launcher.nproc=2`: the probe profile (square GEMMs, a copy, collectives), for comparison;
4. run each target (other widths, rank counts, FSDP, TP and PP layouts) and predict it with both profiles
   (`harness estimate --json`): predicted next to measured, the error of each.
Targets: median |error| <= 10% and worst <= 25% with the trace profile. Writes JSON (default
results/trace_calibration.json). Timings on a shared 2-core host are noisy: the JSON keeps every round.

    python benchmarks/trace_calibration.py [--rounds 2] [--steps 8]
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

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model=gpt-tiny", "model.n_layers=4", "model.n_heads=4", "model.seq_len=128", "model.vocab_size=512",
         "train.micro_batch_size=4"]
SOURCE = ["launcher.nproc=2", "backend=ddp", "model.d_model=256"]
TARGETS = {
    "ddp 2 ranks, width 128": ["launcher.nproc=2", "backend=ddp", "model.d_model=128"],
    "ddp 2 ranks, width 512": ["launcher.nproc=2", "backend=ddp", "model.d_model=512"],
    "1 rank, width 256": ["launcher.nproc=1", "backend=ddp", "model.d_model=256"],
    "ddp 4 ranks, width 256": ["launcher.nproc=4", "backend=ddp", "model.d_model=256", "system.devices_per_node=4"],
    "fsdp 2 ranks, width 384": ["launcher.nproc=2", "backend=fsdp", "model.d_model=384"],
    "tp 2, width 256": ["launcher.nproc=2", "backend=fsdp", "parallel.tp=2", "model.d_model=256"],
    "pp 2, width 256": ["launcher.nproc=2", "backend=fsdp", "parallel.pp=2", "model.d_model=256",
                        "train.global_batch_size=16"],
}


def harness(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": ""}
    env.pop("OMP_NUM_THREADS")
    proc = subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"harness {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def measure(overrides: list[str], steps: int, tmp: str, *extra: str) -> dict:
    run_dir = Path(tmp, "run")
    harness("run", f"hydra.run.dir={run_dir}", "train.warmup_steps=2", f"train.steps={steps}", *MODEL,
            *overrides, *extra)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"dir": run_dir, "iter_time_ms": summary["metrics"]["iter_time_ms"]}


def predict(system: str, overrides: list[str]) -> float:
    est = json.loads(harness("estimate", f"system={system}", *MODEL, *overrides, "--json"))
    return est["iter_time_ms"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--note", default="", help="how quiet the host was, for the record")
    parser.add_argument("--out", default=str(ROOT / "results" / "trace_calibration.json"))
    args = parser.parse_args()
    os.environ["HARNESS_CONFIG_DIR"] = tempfile.mkdtemp(prefix="harness-trace-calibration-")
    rounds = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            source = measure(SOURCE, args.steps, tmp, "profile.enabled=true")
            print(harness("calibrate", f"--from={source['dir']}", f"--name=cpu-trace-{r}").strip(), flush=True)
        harness("calibrate", "launcher.nproc=2", f"--name=cpu-probe-{r}")
        row = {"source_ms": source["iter_time_ms"], "targets": {}}
        for name, overrides in TARGETS.items():
            with tempfile.TemporaryDirectory() as tmp:
                measured = measure(overrides, args.steps, tmp)["iter_time_ms"]
            row["targets"][name] = {"measured_ms": measured, "trace_ms": predict(f"cpu-trace-{r}", overrides),
                                    "probe_ms": predict(f"cpu-probe-{r}", overrides)}
            print(json.dumps({"round": r, name: row["targets"][name]}), flush=True)
        rounds.append(row)
    rows = []
    for name in TARGETS:
        measured = statistics.median(r["targets"][name]["measured_ms"] for r in rounds)
        trace = statistics.median(r["targets"][name]["trace_ms"] for r in rounds)
        probe = statistics.median(r["targets"][name]["probe_ms"] for r in rounds)
        rows.append({"run": name, "overrides": TARGETS[name], "measured_ms": measured, "trace_predicted_ms": trace,
                     "trace_error": trace / measured - 1, "probe_predicted_ms": probe,
                     "probe_error": probe / measured - 1})
    summary = {}
    for kind in ("trace", "probe"):
        errors = sorted(abs(r[f"{kind}_error"]) for r in rows)
        summary[kind] = {"median_abs_error": statistics.median(errors), "max_abs_error": errors[-1]}
    out = {"benchmark": "trace_calibration", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "host": platform.node(), "cpus": os.cpu_count(), "rounds": args.rounds, "steps": args.steps,
           "note": args.note, "source": SOURCE + MODEL, "target": {"median_abs_error": 0.10, "max_abs_error": 0.25},
           "summary": summary, "met": summary["trace"]["median_abs_error"] <= 0.10
           and summary["trace"]["max_abs_error"] <= 0.25, "rows": rows, "per_round": rounds}
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
