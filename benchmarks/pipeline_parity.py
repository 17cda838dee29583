"""The FSDP pipeline layouts the test suite leaves out for its time on a 2-core CI host, against the 1-rank
reference, checked by hand and recorded as JSON: PP 2 x TP 2 x FSDP 2 (8 ranks of gpt-tiny on gloo, with and
without sequence parallelism), PP 4 x HSDP 2 (stages [embedding], [block], [block], [head]), and the schedules
the suite does not run (looped BFS, interleaved zero bubble).

Every run trains gpt-tiny in fp32 with the parity tests' global batch (4 samples) for 4 optimizer steps, as
tests/test_pipeline.py does; each passes when every step's loss is within the tests' 1e-5 of the reference
and its global gradient norm within 1e-5 relative.

    python benchmarks/pipeline_parity.py [--out results/pipeline_parity.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
COMMON = ["model=gpt-tiny", "launcher.omp_num_threads=1", "train.warmup_steps=1", "train.steps=3",
          "train.global_batch_size=4", "train.precision=fp32"]
FSDP = ["backend=fsdp", "train.micro_batch_size=1"]
LAYOUTS = {
    "reference": ["launcher.nproc=1", "train.micro_batch_size=2"],
    "pp2-tp2-fsdp2": ["launcher.nproc=8", *FSDP, "parallel.pp=2", "parallel.tp=2"],
    "pp2-tp2-sp-fsdp2": ["launcher.nproc=8", *FSDP, "parallel.pp=2", "parallel.tp=2",
                         "parallel.sequence_parallel=true"],
    "pp4-hsdp2-gpipe": ["launcher.nproc=8", *FSDP, "parallel.pp=4", "backend.sharding=hybrid_shard",
                        "backend.hybrid_shard_group=1", "backend.pp_schedule=GPipe"],
    "pp2-vpp2-looped-bfs": ["launcher.nproc=2", *FSDP, "parallel.pp=2", "parallel.vpp=2",
                            "backend.pp_schedule=LoopedBFS"],
    "pp2-vpp2-interleaved-zero-bubble": ["launcher.nproc=2", *FSDP, "parallel.pp=2", "parallel.vpp=2",
                                         "backend.pp_schedule=InterleavedZeroBubble"],
}


def run(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "harness.cli", "run", f"hydra.run.dir={run_dir}", *COMMON, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()] \
        if (run_dir / "steps.jsonl").exists() else []
    layout = json.loads((run_dir / "summary.json").read_text())["layout"] if proc.returncode == 0 else None
    return {"command": "harness run " + " ".join(cmd[5:]), "returncode": proc.returncode,
            "losses": [s["loss"] for s in steps], "grad_norms": [s.get("grad_norm") for s in steps],
            "layout": layout, **({"stderr_tail": proc.stderr[-1500:]} if proc.returncode else {})}


def compare(entry: dict[str, Any], reference: dict[str, Any]) -> None:
    """Per-step loss and gradient-norm agreement with the reference, in place."""
    if not entry["losses"] or not reference["losses"]:
        entry["ok"] = False
        return
    entry["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(entry["losses"], reference["losses"]))
    entry["max_rel_grad_norm_diff"] = max(abs(a - b) / b for a, b in zip(entry["grad_norms"],
                                                                         reference["grad_norms"]))
    entry["ok"] = (len(entry["losses"]) == len(reference["losses"]) == 4
                   and entry["max_abs_loss_diff"] <= TOLERANCE and entry["max_rel_grad_norm_diff"] <= TOLERANCE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "results" / "pipeline_parity.json"))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="harness-pipeline-parity-"))
    runs = {name: run(scratch / name, overrides) for name, overrides in LAYOUTS.items()}
    for name, entry in runs.items():
        if name != "reference":
            compare(entry, runs["reference"])
    out = {"benchmark": "FSDP pipeline parity beyond the test suite (benchmarks/pipeline_parity.py)",
           "date": datetime.date.today().isoformat(), "host": platform.node(), "cpus": os.cpu_count(),
           "tolerance": TOLERANCE, "runs": runs,
           "all_ok": all(e["ok"] for name, e in runs.items() if name != "reference")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: [v.get("max_abs_loss_diff"), v.get("max_rel_grad_norm_diff"), v.get("ok")]
                      for k, v in runs.items() if k != "reference"}))
    print(f"wrote {args.out}")
    return 0 if out["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
