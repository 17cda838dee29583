"""GPU acceptance: one prepared run that proves the harness's GPU paths on any CUDA or ROCm machine.

In order, each within its own time limit (about ten minutes in all on one H100/H200):
1. bf16 matmul peak probe: achieved TFLOP/s of a large GEMM against the datasheet peak the harness uses;
2. gpt-1.3b (seq 2048, bf16) on one GPU with the fastest options installed (flash-attn if present, fused
   AdamW, compiled blocks): MFU, HFU, tokens/s, peak memory, allocator retries (target MFU >= 55% on
   H100/H200; the figure reached is reported either way);
3. the same model (uncompiled, 4 steps) under ddp, fsdp, deepspeed ZeRO-1 (torch's AdamW and DeepSpeed's
   FusedAdam) and deepspeed3d on a 1-GPU layout: every backend runs and its per-step losses follow DDP's
   within the bf16 tolerance `LOSS_TOL`;
4. meta-device build with sharded (FSDP2) materialisation on the GPU against the model built directly on
   the GPU (same seed: equal), and against a CPU-built reference (different generators: same statistics);
5. NVML: the energy counter against integrated power over >= 5 s of load (within 5%), idle power, the
   device found by UUID with the PCI bus id torch reports (CUDA_VISIBLE_DEVICES ordering);
6. fp16 with dynamic loss scaling on DeepSpeed and on FSDP2: overflowing steps skipped and counted;
7. a batch sweep whose second point cannot fit: that point ends `status: oom`, the sweep goes on.
Writes one JSON under results/ (`--out`): every check's figures, pass/fail, command and seconds,
and the device, driver and versions. Refuses in one line, writing nothing, where torch sees no GPU.

    scripts/gpu_acceptance.sh [--out DIR] [--only 1,2,...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOSS_TOL = 0.05
"""Per-step loss agreement of two bf16 runs of the same model and data: bf16 rounding in different kernel
orders moves a loss near ln(vocab) by a few hundredths."""
MFU_TARGET = 0.55
GPT13B = ["model=gpt-1.3b", "model.seq_len=2048", "system=cuda", "train.precision=bf16", "telemetry.idle_s=3"]


def harness_run(run_dir: Path, *overrides: str, multirun: bool = False, timeout: float = 600) -> dict[str, Any]:
    """One `harness run` in a subprocess; its summary (or, for a sweep, every point's) and the command."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    cmd = [sys.executable, "-m", "harness.cli", "run", *(["-m"] if multirun else []), f"{key}={run_dir}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    summaries = sorted(run_dir.rglob("summary.json")) if run_dir.exists() else []
    return {"command": "harness " + " ".join(cmd[3:]), "returncode": proc.returncode,
            "stderr_tail": proc.stderr[-1500:], "summaries": [json.loads(p.read_text()) for p in summaries]}


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def check_matmul() -> dict[str, Any]:
    import torch

    from harness.costmodel.peaks import lookup_peak

    n, iterations = 8192, 50
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        a @ b
    end.record()
    torch.cuda.synchronize()
    tflops = 2 * n**3 * iterations / (start.elapsed_time(end) / 1e3) / 1e12
    peak = lookup_peak(torch.cuda.get_device_name(0), "bf16")
    return {"ok": True, "achieved_tflops": tflops, "datasheet_tflops": peak.tflops, "peak_source": peak.source,
            "fraction_of_peak": tflops / peak.tflops if peak.tflops else None, "shape": [n, n, n]}


def fastest_options() -> list[str]:
    import importlib.util

    attention = "flash_attn" if importlib.util.find_spec("flash_attn") else "sdpa"
    return [f"model.attention={attention}", "train.optimizer=adamw_fused", "train.compile=true"]


def check_mfu(scratch: Path) -> dict[str, Any]:
    run = harness_run(scratch / "mfu", *GPT13B, *fastest_options(), "train.micro_batch_size=8",
                      "train.warmup_steps=3", "train.steps=10", timeout=900)
    if run["returncode"] or not run["summaries"]:
        return {"ok": False, **run}
    m = run["summaries"][0]["metrics"]
    return {"ok": True, "command": run["command"], "mfu": m["mfu"], "hfu": m["hfu"], "tokens_per_s": m["tokens_per_s"],
            "model_tflops_per_device": m["model_tflops_per_device"], "peak_memory_mb": m["peak_memory_mb"],
            "alloc_retries": m["alloc_retries"], "tokens_per_joule": m.get("tokens_per_joule"),
            "power_w": m.get("power_w"), "meets_mfu_target": m["mfu"] is not None and m["mfu"] >= MFU_TARGET,
            "mfu_target": MFU_TARGET, "kernels": run["summaries"][0].get("kernels")}


def check_backends(scratch: Path) -> dict[str, Any]:
    common = [*GPT13B, "train.micro_batch_size=2", "train.global_batch_size=4", "train.warmup_steps=0",
              "train.steps=4", "telemetry.idle_s=0"]
    layouts = {"ddp": ["backend=ddp"], "fsdp": ["backend=fsdp"],
               "zero1": ["backend=deepspeed", "parallel.zero_stage=1", "train.optimizer=adamw"],
               # DeepSpeed's own FusedAdam (the GPU default, JIT-built on first use): the same update
               "zero1_fused_adam": ["backend=deepspeed", "parallel.zero_stage=1",
                                    "train.optimizer=deepspeed_fused_adam"],
               "deepspeed3d": ["backend=deepspeed3d", "train.optimizer=adamw"]}
    out: dict[str, Any] = {"tolerance": LOSS_TOL, "runs": {}}
    for name, overrides in layouts.items():
        run = harness_run(scratch / name, *common, *overrides)
        ok = run["returncode"] == 0
        out["runs"][name] = {"command": run["command"], "ok": ok,
                             "losses": losses(scratch / name) if ok else None,
                             "error": None if ok else run["stderr_tail"]}
    reference = out["runs"]["ddp"]["losses"]
    for name, entry in out["runs"].items():
        if entry["ok"] and reference:
            entry["max_loss_diff_vs_ddp"] = max(abs(a - b) for a, b in zip(entry["losses"], reference))
    out["ok"] = all(e["ok"] and e.get("max_loss_diff_vs_ddp", 1) <= LOSS_TOL for e in out["runs"].values())
    return out


def check_meta_init() -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from harness.backends.base import materialize
    from harness.models.gpt import GPT, GPTConfig

    cfg = GPTConfig(n_layers=4, d_model=256, n_heads=8, seq_len=256, vocab_size=4096)
    if not dist.is_initialized():  # fully_shard needs a process group: this process as a 1-rank NCCL group
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
    torch.manual_seed(0)
    with torch.device("cuda"):
        direct = GPT(cfg)
    torch.manual_seed(0)
    with torch.device("meta"):
        sharded = GPT(cfg)
    for block in sharded.blocks:
        fully_shard(block)
    fully_shard(sharded)
    torch.manual_seed(0)
    materialize(sharded, torch.device("cuda"))
    torch.manual_seed(0)
    cpu = GPT(cfg)
    equal, stats = True, []
    for (name, a), b, c in zip(direct.named_parameters(), sharded.parameters(), cpu.parameters()):
        full = b.full_tensor() if hasattr(b, "full_tensor") else b
        equal &= torch.equal(a.detach(), full.detach())
        if c.numel() > 1 and c.std() > 0:
            stats.append(abs(float(full.float().std()) / float(c.std()) - 1))
    dist.destroy_process_group()
    return {"ok": bool(equal) and max(stats) < 0.05, "sharded_equals_direct_gpu_init": bool(equal),
            "max_std_rel_diff_vs_cpu_init": max(stats), "params": sum(p.numel() for p in cpu.parameters())}


def check_nvml() -> dict[str, Any]:
    import pynvml
    import torch

    if torch.version.hip:
        return {"ok": True, "skipped": "ROCm: NVML does not apply (amdsmi energy is checked by the telemetry tests "
                "against its documented behaviour only)"}
    pynvml.nvmlInit()
    props = torch.cuda.get_device_properties(0)
    uuid = str(props.uuid)
    handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    bus = pynvml.nvmlDeviceGetPciInfo(handle).busId
    bus = bus.decode() if isinstance(bus, bytes) else bus

    def sample(seconds: float, work: Callable[[], None]) -> tuple[float, float, float]:
        """(counter J, integrated J, mean W) over `seconds` of `work`."""
        e0, t0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle), time.perf_counter()
        last_t, last_w, integral, powers = t0, pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3, 0.0, []
        while time.perf_counter() - t0 < seconds:
            work()
            now, watts = time.perf_counter(), pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3
            integral += (now - last_t) * (watts + last_w) / 2
            powers.append(watts)
            last_t, last_w = now, watts
        torch.cuda.synchronize()
        counter = (pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) - e0) / 1e3
        return counter, integral, statistics.fmean(powers)

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def load() -> None:
        for _ in range(4):
            a @ a
        torch.cuda.synchronize()

    _, _, idle_w = sample(3.0, lambda: time.sleep(0.05))
    counter, integral, busy_w = sample(6.0, load)
    pynvml.nvmlShutdown()
    agreement = counter / integral - 1
    _, nvml_bus, device_fn = bus.split(":")[-3:]  # "00000000:1B:00.0": domain, bus, device.function
    same_device = (int(nvml_bus, 16), int(device_fn.split(".")[0], 16)) == (
        getattr(props, "pci_bus_id", None), getattr(props, "pci_device_id", None))
    return {"ok": abs(agreement) <= 0.05 and same_device, "counter_j": counter, "integrated_j": integral,
            "counter_vs_integrated": agreement, "idle_w": idle_w, "busy_w": busy_w, "uuid": str(props.uuid),
            "nvml_bus_id": bus, "torch_pci_bus_device": [getattr(props, "pci_bus_id", None),
                                                          getattr(props, "pci_device_id", None)],
            "nvml_device_is_torch_device_0": same_device,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def check_fp16(scratch: Path) -> dict[str, Any]:
    """DeepSpeed's loss scaler and FSDP2's (ShardedGradScaler): a scale of 2**32 overflows fp16 gradients, so the
    first steps are skipped and counted, and the run goes on with a finite loss."""
    common = ["model=gpt-125m", "system=cuda", "train.precision=fp16", "backend.initial_scale_power=32",
              "train.optimizer=adamw", "train.warmup_steps=0", "train.steps=8", "telemetry.idle_s=0"]
    out: dict[str, Any] = {}
    for name, backend in {"deepspeed": ["backend=deepspeed", "parallel.zero_stage=1"],
                          "fsdp": ["backend=fsdp"]}.items():
        run = harness_run(scratch / f"fp16-{name}", *common, *backend)
        if run["returncode"] or not run["summaries"]:
            out[name] = {"ok": False, **run}
            continue
        skipped = run["summaries"][0]["metrics"].get("skipped_steps")
        out[name] = {"ok": bool(skipped), "command": run["command"], "skipped_steps": skipped,
                     "loss_per_step": losses(scratch / f"fp16-{name}")}
    return {"ok": all(entry["ok"] for entry in out.values()), **out}


def check_oom(scratch: Path) -> dict[str, Any]:
    run = harness_run(scratch / "oom", *GPT13B, "train.micro_batch_size=1,512", "launcher.skip_memory_check=true",
                      "train.warmup_steps=1", "train.steps=2", "telemetry.idle_s=0", multirun=True)
    statuses = [s["status"] for s in run["summaries"]]
    return {"ok": statuses == ["ok", "oom"], "statuses": statuses, "command": run["command"],
            "sweep_exit_code": run["returncode"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--only", default="1,2,3,4,5,6,7", help="comma-separated check numbers")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        build = torch.version.cuda or torch.version.hip or "cpu"
        print(f"gpu_acceptance: no CUDA or ROCm GPU visible to torch {torch.__version__} (built for {build}); "
              "run it on a GPU node with a CUDA or ROCm build of torch", file=sys.stderr)
        return 2
    from harness.run.environment import environment

    scratch = Path(tempfile.mkdtemp(prefix="harness-acceptance-"))
    checks: dict[str, Callable[[], dict[str, Any]]] = {
        "1_matmul_peak": check_matmul, "2_gpt13b_mfu": lambda: check_mfu(scratch),
        "3_backends": lambda: check_backends(scratch), "4_meta_init": check_meta_init, "5_nvml": check_nvml,
        "6_fp16_loss_scaling": lambda: check_fp16(scratch), "7_oom_in_sweep": lambda: check_oom(scratch)}
    wanted = {int(n) for n in args.only.split(",")}
    results: dict[str, Any] = {}
    for name, check in checks.items():
        if int(name.split("_")[0]) not in wanted:
            continue
        started = time.perf_counter()
        try:
            results[name] = check()
        except Exception as exc:  # noqa: BLE001 - one failed check must not hide the others' figures
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - started
        print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'} ({results[name]['seconds']:.0f} s)", flush=True)
    device = torch.cuda.get_device_name(0)
    out = {"benchmark": "GPU acceptance (benchmarks/gpu_acceptance.py)", "date": datetime.date.today().isoformat(),
           "command": "scripts/gpu_acceptance.sh " + " ".join(sys.argv[1:]), "device": device,
           "env": environment(world_size=1, hostnames=[os.uname().nodename], devices=[device], launcher="none"),
           "checks": results, "all_ok": all(r["ok"] for r in results.values())}
    path = Path(args.out) / f"gpu_acceptance-{device.replace(' ', '_')}-{out['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return 0 if out["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
