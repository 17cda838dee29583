"""The cost model's step time against measured runs on this CPU, after `harness calibrate`.

For 1, 2 and 4 local ranks: calibrate (every rank measures while its peers do, so the profile
describes a rank sharing this host's cores with N−1 others) into a profile cpu-n<N> (kept in a
temporary HARNESS_CONFIG_DIR, so the user's own profiles are untouched), then
`harness run` gpt-tiny and a ~20M model (DDP) on that profile and compare the run's predicted
iteration time with its measured median. Target: |error| <= 25%. Writes JSON
(default results/costmodel_cpu.json). On a shared host timings are noisy: rerun.

    python benchmarks/costmodel_cpu.py [--ranks 1 2 4] [--steps 5] [--rounds 2]
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
MODELS = {
    "gpt-tiny": ["model=gpt-tiny"],
    "gpt-20m": ["model.name=gpt-20m", "model.n_layers=6", "model.d_model=512", "model.n_heads=8",
                "model.seq_len=256", "model.vocab_size=8192"],
}


def harness(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"harness {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1,
                        help="calibrate-then-run rounds; the row reports the medians over rounds")
    parser.add_argument("--note", default="", help="how quiet the host was, for the record")
    parser.add_argument("--out", default=str(ROOT / "results" / "costmodel_cpu.json"))
    args = parser.parse_args()
    os.environ["HARNESS_CONFIG_DIR"] = tempfile.mkdtemp(prefix="harness-costmodel-cpu-")
    points: dict[tuple[str, int], dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for nproc in args.ranks:
            system = f"cpu-n{nproc}"
            harness("calibrate", f"launcher.nproc={nproc}", "launcher.omp_num_threads=1", f"--name={system}")
            for name, model in MODELS.items():
                with tempfile.TemporaryDirectory() as tmp:
                    harness("run", f"hydra.run.dir={tmp}/run", f"system={system}", f"launcher.nproc={nproc}",
                            "launcher.omp_num_threads=1", "train.warmup_steps=2", f"train.steps={args.steps}", *model)
                    summary = json.loads(Path(tmp, "run", "summary.json").read_text())
                point = points.setdefault((name, nproc), {"measured_ms": [], "predicted_ms": [], "params": []})
                point["measured_ms"].append(summary["metrics"]["iter_time_ms"])
                point["predicted_ms"].append(summary["prediction"]["iter_time_ms"])
                point["params"] = [summary["model"]["params"]]
                print(json.dumps({"model": name, "ranks": nproc, **point}), flush=True)
    rows = []
    for (name, nproc), point in points.items():
        measured, predicted = statistics.median(point["measured_ms"]), statistics.median(point["predicted_ms"])
        error = predicted / measured - 1
        rows.append({"model": name, "ranks": nproc, "params": point["params"][0], "measured_ms": measured,
                     "predicted_ms": predicted, "error": error, "within_25_percent": abs(error) <= 0.25,
                     "per_round": {"measured_ms": point["measured_ms"], "predicted_ms": point["predicted_ms"]}})
    out = {"benchmark": "costmodel_cpu", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "host": platform.node(), "cpus": os.cpu_count(), "rounds": args.rounds,
           "note": args.note, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
