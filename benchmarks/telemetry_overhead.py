"""What telemetry costs: step time of `harness run` with the sampler on over the same run with it off,
and the sampler thread's own CPU time per second of wall time.

The two arms differ only in `telemetry.source` (rapl vs none) and run in fresh subprocesses in ABBA
order (the helpers of benchmarks/overhead.py). This host has no GPU and no /sys/class/powercap, so
the telemetry arm reads a powercap tree made in a temporary directory, with a package and a DRAM
zone per socket: the background thread samples at `telemetry.interval_ms`, every step boundary
reads the counters synchronously, and psutil reads the process, exactly as on a RAPL host. (The
process meter runs in both arms: it is not optional.) The sampler's CPU time comes from
`time.thread_time()` inside its thread, so busy neighbours on a shared host do not inflate it.
Because wall-clock step times of separate processes drift by far more than 1% on a small host, the
step-time target is judged in ONE process: one bare training loop (one model throughout) with the
sampler started and stopped in alternating blocks (ABBA), `mark_step` at every boundary. The
end-to-end `harness run` ratio is reported too. The CPU cost of one step boundary is also measured
in-process (thread CPU time).
On a host this small even that resolves only a few percent (the JSON gives a bootstrap interval), so
the step-time ratio is also bounded from CPU times: the sampler thread can delay the training loop by
no more than its own CPU time, plus the synchronous boundary cost per step.
Targets: step-time ratio <= 1.01; sampler CPU <= 1% of one core at 10 Hz.
Writes JSON (default results/telemetry_overhead.json).

    python benchmarks/telemetry_overhead.py [--rounds 2] [--steps 15] [--blocks 8] [--block-steps 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import MODELS, bare_trainer, run_harness, timed_steps  # noqa: E402

STEP_TARGET, CPU_TARGET = 1.01, 0.01


def boundary_cost_us(powercap: Path, boundaries: int = 2000) -> dict[str, float]:
    """CPU time of one step boundary (`Sampler.mark_step`: synchronous counter reads plus psutil), in µs.

    Measured in-process with `time.thread_time`, so it holds on a busy host where step times do not;
    divided by a step time it bounds the per-step overhead from below the noise floor.
    """
    import time

    from harness.telemetry.rapl import RaplSource
    from harness.telemetry.sampler import Sampler

    sampler = Sampler(RaplSource(powercap), reason=None, shared=False, interval_s=0.1, idle_s=0.0,
                      warmup_steps=0, host="bench", rank=0)
    sampler.start()
    start = time.thread_time()
    for _ in range(boundaries):
        sampler.mark_step(time.perf_counter())
    cost = (time.thread_time() - start) / boundaries * 1e6
    sampler.stop()
    return {"mark_step_cpu_us": cost, "boundaries": boundaries}


def interleaved(dims: dict[str, int], powercap: Path, blocks: int, steps: int, threads: int,
                interval_s: float) -> dict[str, list[list[float]]]:
    """Step times (per block) with the sampler on and off in alternating blocks (ABBA) of one training loop.

    Separate processes of the same code differ by up to ~2x in step time on this small VM, far more
    than the 1% to resolve, and so do fresh models within one process (where their memory lands); one
    model trained throughout, the sampler started and stopped between blocks, leaves only the sampler.
    The first step of each block is dropped (it follows the switch).
    """
    from harness.telemetry.rapl import RaplSource
    from harness.telemetry.sampler import Sampler

    step = bare_trainer(dims, threads)
    timed_steps(step, 2)  # warm-up
    times: dict[str, list[list[float]]] = {"on": [], "off": []}
    for i in range(blocks):
        for arm in (("on", "off") if i % 2 == 0 else ("off", "on")):
            if arm == "off":
                times[arm].append(timed_steps(step, steps, warmup=1))
                continue
            sampler = Sampler(RaplSource(powercap), reason=None, shared=False, interval_s=interval_s, idle_s=0.0,
                              warmup_steps=0, host="bench", rank=0)
            sampler.start()
            times[arm].append(timed_steps(step, steps, warmup=1, on_boundary=sampler.mark_step))
            sampler.stop()
    return times


def ratio_interval(blocks: dict[str, list[list[float]]], resamples: int = 2000) -> tuple[float, float, float]:
    """Median step time on / off, with a 95% bootstrap interval over ABBA block pairs (resampled whole,
    so slow stretches of the host stay paired): what this host can resolve."""
    def ratio(pairs: list[int]) -> float:
        on = [t for i in pairs for t in blocks["on"][i]]
        off = [t for i in pairs for t in blocks["off"][i]]
        return statistics.median(on) / statistics.median(off)

    n = len(blocks["on"])
    rng = random.Random(0)
    draws = sorted(ratio([rng.randrange(n) for _ in range(n)]) for _ in range(resamples))
    return ratio(list(range(n))), draws[int(0.025 * resamples)], draws[int(0.975 * resamples) - 1]


def fake_powercap(root: Path, sockets: int = 2) -> Path:
    """package-N with a dram subzone per socket, as /sys/class/powercap lays them out."""
    for n in range(sockets):
        for zone, name in ((root / f"intel-rapl:{n}", f"package-{n}"),
                           (root / f"intel-rapl:{n}" / f"intel-rapl:{n}:0", "dram")):
            zone.mkdir(parents=True)
            (zone / "name").write_text(name + "\n")
            (zone / "energy_uj").write_text("123456789\n")
            (zone / "max_energy_range_uj").write_text("262143328850\n")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--interval-ms", type=float, default=100.0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--blocks", type=int, default=8, help="in-process comparison: ABBA blocks per arm")
    parser.add_argument("--block-steps", type=int, default=8, help="in-process comparison: timed steps per block")
    parser.add_argument("--note", default="", help="how quiet the host was, for the record")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "telemetry_overhead.json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        powercap = fake_powercap(Path(tmp) / "powercap")
        boundary = boundary_cost_us(powercap)
        print(f"step boundary (mark_step): {boundary['mark_step_cpu_us']:.1f} µs of CPU")
        arms = {
            "on": ["telemetry.source=rapl", f"telemetry.powercap_root={powercap}",
                   f"telemetry.interval_ms={args.interval_ms}", "telemetry.idle_s=1"],
            "off": ["telemetry.source=none"],
        }
        for name in args.models:
            times: dict[str, list[float]] = {"on": [], "off": []}
            busy: list[float] = []
            for i in range(args.rounds):
                for arm in (("on", "off") if i % 2 == 0 else ("off", "on")):
                    step_ms, summary = run_harness(name, MODELS[name], args.steps, args.warmup, args.threads,
                                                   arms[arm])
                    times[arm] += step_ms
                    if arm == "on":
                        assert summary["telemetry"]["source"] == "rapl", summary["telemetry"]
                        busy.append(summary["telemetry"]["sampler_cpu_fraction_of_core"])
            ratio = statistics.median(times["on"]) / statistics.median(times["off"])
            inproc = interleaved(MODELS[name], powercap, args.blocks, args.block_steps, args.threads,
                                 args.interval_ms / 1e3)
            inproc_ratio, low, high = ratio_interval(inproc)
            flat = {arm: [t for block in inproc[arm] for t in block] for arm in inproc}
            cpu = max(busy)
            bound = 1 + boundary["mark_step_cpu_us"] / 1e3 / statistics.median(times["off"])
            results[name] = {
                "dims": MODELS[name], "median_ms_on": statistics.median(times["on"]),
                "median_ms_off": statistics.median(times["off"]), "step_time_ratio": ratio,
                "step_time_target": STEP_TARGET,
                "in_process": {"median_ms_on": statistics.median(flat["on"]),
                               "median_ms_off": statistics.median(flat["off"]), "step_time_ratio": inproc_ratio,
                               "step_time_ratio_95pct_interval": [low, high],
                               "meets_step_time_target": inproc_ratio <= STEP_TARGET,
                               "interval_within_target": high <= STEP_TARGET,
                               "block_ms_on": inproc["on"], "block_ms_off": inproc["off"],
                               "blocks": args.blocks, "steps_per_block": args.block_steps,
                               "method": "one process, one model trained throughout, sampler on/off in alternating "
                                         "blocks (ABBA), mark_step at every boundary"},
                "boundary_cost_ratio": bound,
                # The sampler thread delays the training loop by at most its own CPU time (it holds the GIL
                # or one core, and an OpenMP team waits for a preempted member at most that long), and each
                # step boundary adds its measured synchronous cost: a bound made of CPU times, which do not
                # drift with a shared host the way wall-clock step times do.
                "cpu_time_bound_ratio": bound + cpu,
                "meets_step_time_target_by_cpu_time_bound": bound + cpu <= STEP_TARGET,
                "sampler_cpu_fraction_of_core": busy, "sampler_cpu_target": CPU_TARGET,
                "meets_sampler_cpu_target": cpu <= CPU_TARGET, "step_ms_on": times["on"], "step_ms_off": times["off"],
            }
            print(f"{name}: in one process (sampler on/off in alternating blocks) ratio {inproc_ratio:.3f} "
                  f"(95% interval {low:.3f}..{high:.3f}) "
                  f"(target <= {STEP_TARGET}); separate harness runs: on {statistics.median(times['on']):.2f} ms, "
                  f"off {statistics.median(times['off']):.2f} ms, ratio {ratio:.3f}; "
                  f"bound from CPU times {bound + cpu:.4f}; "
                  f"sampler thread {100 * cpu:.3f}% of a core "
                  f"at {1e3 / args.interval_ms:.0f} Hz (target <= {100 * CPU_TARGET:.0f}%)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "harness run (1 rank, ddp, fp32, CPU) with telemetry (RAPL source on a powercap tree in a "
                     "temporary directory) vs telemetry.source=none; median step time and the sampler thread's "
                     "CPU time (time.thread_time) per wall second",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "host": {"cpus": len(os.sched_getaffinity(0)), "machine": platform.machine(), "threads": args.threads,
                 "note": args.note},
        "interval_ms": args.interval_ms, "rounds": args.rounds, "steps_per_round": args.steps,
        "step_boundary": boundary,
        "results": results,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
