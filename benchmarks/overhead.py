"""What the harness costs: median step time of `harness run` (1 rank) over a bare PyTorch loop.

Both train the same `harness.models.gpt.GPT` with the same batch, AdamW settings and gradient clipping on
the same number of threads; the bare loop draws its tokens with one `torch.randint` per step. The
harness's iteration time is measured end to end (step boundary to step boundary, so its data,
logging and reductions count). Both run in fresh subprocesses with the same thread count, in
ABBA order over the rounds, because on a shared host the same code drifts by tens of percent
from one process to the next.
Target: ratio <= 1.03. Writes JSON (default results/overhead.json).

    python benchmarks/overhead.py [--rounds 2] [--steps 20]
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
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.models.gpt import GPT, GPTConfig  # noqa: E402

MODELS = {
    "gpt-tiny": {"n_layers": 2, "d_model": 64, "n_heads": 4, "seq_len": 128, "vocab_size": 512, "batch": 8},
    "gpt-20m": {"n_layers": 6, "d_model": 512, "n_heads": 8, "seq_len": 256, "vocab_size": 8192, "batch": 4},
}


def model_overrides(name: str, dims: dict[str, int]) -> list[str]:
    return [f"model.name={name}"] + [f"model.{k}={v}" for k, v in dims.items() if k != "batch"]


def run_harness(name: str, dims: dict[str, int], steps: int, warmup: int, threads: int,
                extra: Sequence[str] = ()) -> tuple[list[float], dict[str, Any]]:
    """Timed step times (ms) and the summary of one `harness run` in a fresh subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "harness.cli", "run", f"hydra.run.dir={run_dir}", *model_overrides(name, dims),
               f"train.micro_batch_size={dims['batch']}", f"train.steps={steps}", f"train.warmup_steps={warmup}",
               f"launcher.omp_num_threads={threads}", *extra]
        subprocess.run(cmd, cwd=tmp, check=True, capture_output=True, text=True)
        lines = (run_dir / "steps.jsonl").read_text().splitlines()
        times = [json.loads(line)["iter_time_ms"] for line in lines if not json.loads(line)["warmup"]]
        return times, json.loads((run_dir / "summary.json").read_text())


def harness_step_ms(name: str, dims: dict[str, int], steps: int, warmup: int, threads: int) -> list[float]:
    return run_harness(name, dims, steps, warmup, threads)[0]


def bare_trainer(dims: dict[str, int], threads: int) -> Callable[[], None]:
    """One step of a plain training loop per call: one model and optimizer, a fresh batch each step."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = GPTConfig(**{k: v for k, v in dims.items() if k != "batch"})
    model = GPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def step() -> None:
        tokens = torch.randint(0, cfg.vocab_size, (dims["batch"], cfg.seq_len + 1))
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # the harness reads the loss every step too
    return step


def timed_steps(step: Callable[[], None], steps: int, warmup: int = 0,
                on_boundary: Optional[Callable[[float], Any]] = None) -> list[float]:
    """Step times (ms) of `steps` calls after `warmup`; `on_boundary(now)` runs at each step boundary if given."""
    times = []
    last = time.perf_counter()
    for i in range(warmup + steps):
        step()
        now = time.perf_counter()
        if on_boundary is not None:
            on_boundary(now)
        if i >= warmup:
            times.append((now - last) * 1e3)
        last = now
    return times


def bare_step_ms(dims: dict[str, int], steps: int, warmup: int, threads: int) -> list[float]:
    """Step times (ms) of a plain training loop."""
    return timed_steps(bare_trainer(dims, threads), steps, warmup)


def bare_in_subprocess(name: str, steps: int, warmup: int, threads: int) -> list[float]:
    cmd = [sys.executable, __file__, "--bare-worker", name, "--steps", str(steps), "--warmup", str(warmup),
           "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--bare-worker", choices=list(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "overhead.json")
    args = parser.parse_args()
    if args.bare_worker:
        print(json.dumps(bare_step_ms(MODELS[args.bare_worker], args.steps, args.warmup, args.threads)))
        return
    results = {}
    for name in args.models:
        dims = MODELS[name]
        ours: list[float] = []
        bare: list[float] = []
        for i in range(args.rounds):
            order = [harness_step_ms, None] if i % 2 == 0 else [None, harness_step_ms]
            for which in order:
                if which is None:
                    bare += bare_in_subprocess(name, args.steps, args.warmup, args.threads)
                else:
                    ours += harness_step_ms(name, dims, args.steps, args.warmup, args.threads)
        with torch.device("meta"):
            params = GPT(GPTConfig(**{k: v for k, v in dims.items() if k != "batch"})).num_params()
        ratio = statistics.median(ours) / statistics.median(bare)
        results[name] = {"params": params, "dims": dims, "harness_median_ms": statistics.median(ours),
                         "bare_median_ms": statistics.median(bare), "ratio": ratio, "target": 1.03,
                         "meets_target": ratio <= 1.03, "harness_step_ms": ours, "bare_step_ms": bare}
        print(f"{name} ({params:,} params): harness {statistics.median(ours):.2f} ms, "
              f"bare {statistics.median(bare):.2f} ms, ratio {ratio:.3f} (target <= 1.03)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "harness run (1 rank, ddp, fp32, CPU) vs a bare PyTorch loop, median step time",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "host": {"cpus": len(os.sched_getaffinity(0)), "machine": platform.machine(), "threads": args.threads},
        "torch": torch.__version__,
        "rounds": args.rounds, "steps_per_round": args.steps,
        "results": results,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
