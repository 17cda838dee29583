"""How long `harness plan` takes to search the whole space, on one core: the issue's case (GPT-175B on up to
3072 Frontier GCDs, global batch 1536, every backend) and a 1T case. Target: under 5 s for the first.
Writes JSON (default results/plan_speed.json): seconds for the whole command (composition,
search, validation and estimates of the printed rows) and for the search alone, with the search's counts.

    python benchmarks/plan_speed.py [--rounds 5]

Each figure is the median over the rounds, with its range: the same code on the same 2-core VM has measured 3.6 s
on one day and 4.9-6.2 s in a slow spell of another, so compare commits within one sitting.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "gpt-175b-frontier-3072": ["model=gpt-175b", "system=frontier", "parallel.world_size=3072",
                               "train.global_batch_size=1536"],
    "gpt-1t-frontier-3072": ["model=gpt-1t", "system=frontier", "parallel.world_size=3072",
                             "train.global_batch_size=1600"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "results" / "plan_speed.json"))
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    pin = ["taskset", "-c", "0"] if sys.platform == "linux" else []
    results = {}
    for name, overrides in CASES.items():
        walls, searches = [], []
        out: dict = {}
        for _ in range(args.rounds):
            started = time.perf_counter()
            proc = subprocess.run([*pin, sys.executable, "-m", "harness.cli", "plan", *overrides, "--json"],
                                  cwd=ROOT, env=env, capture_output=True, text=True, check=True)
            walls.append(time.perf_counter() - started)
            out = json.loads(proc.stdout)
            searches.append(out["search"]["search_seconds"])
        results[name] = {"command": "harness plan " + " ".join(overrides), "command_s": statistics.median(walls),
                         "command_s_range": [min(walls), max(walls)],
                         "search_s": statistics.median(searches), "search_s_range": [min(searches), max(searches)],
                         "rounds": args.rounds,
                         "counts": out["search"]["counts"], "layouts_fitting": out["search"]["layouts_fitting"],
                         "best": {k: out["best"][0][k] for k in ("devices", "backend", "tp", "pp", "vpp", "dp",
                                                                   "micro_batch_size", "step_time_s")},
                         "pareto_points": len(out["pareto"]),
                         "under_5_s": statistics.median(walls) < 5.0}
        print(f"{name}: command {results[name]['command_s']:.2f} s ({min(walls):.2f}-{max(walls):.2f}, "
              f"{args.rounds} rounds), search {results[name]['search_s']:.2f} s")
    record = {"date": datetime.date.today().isoformat(), "host": platform.node(), "cpu": platform.processor(),
              "cores_used": 1, "python": platform.python_version(), "cases": results}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
