"""What produced a number: summary.json's `env` block.

A figure without its software and hardware is not comparable with anything: the harness commit (and
whether the tree had uncommitted changes), Python, torch and the accelerator stack it was built for
(CUDA, ROCm/HIP, XPU), the collective library (NCCL or RCCL) and the driver, the device's name,
memory and count per node, the versions of the libraries that run the step (and the optional fast
kernels), and the scheduler's job. What cannot be known here is `null`, with a reason beside it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata, util
from pathlib import Path
from typing import Any, Optional

from harness import DISTRIBUTION

PACKAGES = ("torch", "lightning-fabric", "deepspeed", "megatron-core", "hydra-core", "omegaconf", "numpy",
            "nvidia-ml-py", "amdsmi", "flash-attn", "HolisticTraceAnalysis", DISTRIBUTION)


def versions() -> dict[str, Optional[str]]:
    """Python and each package's installed version (None: not installed); NVIDIA apex by its modules,
    because the package index's `apex` is an unrelated web toolkit."""
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for package in PACKAGES:
        key = "harness" if package == DISTRIBUTION else package
        try:
            out[key] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[key] = None
    out["apex"] = nvidia_apex_version()
    return out


def nvidia_apex_version() -> Optional[str]:
    """NVIDIA apex's version if it is what `import apex` finds (its `optimizers` and `normalization` packages
    are there), without importing it."""
    spec = util.find_spec("apex")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    if not ((root / "optimizers").is_dir() and (root / "normalization").is_dir()):
        return None
    try:
        return metadata.version("apex")
    except metadata.PackageNotFoundError:
        return "unknown version"


def git_state(where: Path = Path(__file__).resolve().parents[2]) -> dict[str, Any]:
    """The harness checkout's commit and whether its tracked files differ from it; an installed package
    (no checkout) says so."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None,
                "commit_reason": f"{where} is not a git checkout (an installed package), or git is missing"}
    return {"commit": commit, "dirty": dirty}


def accelerator_stack() -> dict[str, Any]:
    """torch's build (CUDA, HIP or XPU), the collective library's version, the driver, and this node's devices."""
    import torch

    out: dict[str, Any] = {"torch_cuda": torch.version.cuda, "torch_hip": torch.version.hip,
                           "torch_xpu": getattr(torch.version, "xpu", None), "cpu_cores": cpu_cores(),
                           "threads_per_rank": torch.get_num_threads()}
    if torch.cuda.is_available():
        out["collectives"] = "rccl" if torch.version.hip else "nccl"
        try:
            out["collectives_version"] = ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError) as exc:
            out["collectives_version"], out["collectives_version_reason"] = None, f"{type(exc).__name__}: {exc}"
        count = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        out.update(devices_per_node=count, device_name=props.name, device_memory_gb=props.total_memory / 1e9)
        out.update(driver_version(bool(torch.version.hip)))
    else:
        out.update(collectives="gloo", devices_per_node=None, device_name=cpu_model(), device_memory_gb=None,
                   driver=None, driver_reason="no accelerator visible to torch")
    return out


def cpu_cores() -> int:
    """The cores this process may run on (its affinity), which the host's ranks share."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def driver_version(rocm: bool) -> dict[str, Any]:
    """The kernel driver's version: NVML's on NVIDIA, amdsmi's on AMD (each optional, `.[gpu]` / `.[amd]`)."""
    try:
        if rocm:
            import amdsmi

            amdsmi.amdsmi_init()
            try:
                handle = amdsmi.amdsmi_get_processor_handles()[0]
                return {"driver": amdsmi.amdsmi_get_gpu_driver_info(handle)["driver_version"]}
            finally:
                amdsmi.amdsmi_shut_down()
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
            return {"driver": version.decode() if isinstance(version, bytes) else version}
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - a missing library or permission is a reason, not a failure
        return {"driver": None, "driver_reason": f"{type(exc).__name__}: {exc}"}


def scheduler_job(env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The batch job the run belongs to (Slurm, PBS, LSF), its node and task counts; None outside a job."""
    env = dict(os.environ if env is None else env)
    if "SLURM_JOB_ID" in env:
        return {"scheduler": "slurm", "job_id": env["SLURM_JOB_ID"], "nodes": _int(env.get("SLURM_JOB_NUM_NODES")),
                "tasks": _int(env.get("SLURM_NTASKS") or env.get("SLURM_STEP_NUM_TASKS"))}
    if "PBS_JOBID" in env:
        nodefile = env.get("PBS_NODEFILE")
        nodes = len(set(Path(nodefile).read_text().split())) if nodefile and Path(nodefile).is_file() else None
        return {"scheduler": "pbs", "job_id": env["PBS_JOBID"], "nodes": nodes, "tasks": _int(env.get("PMI_SIZE"))}
    if "LSB_JOBID" in env:
        hosts = env.get("LSB_MCPU_HOSTS", "").split()[::2]  # "host n host n ..." (batch host first)
        return {"scheduler": "lsf", "job_id": env["LSB_JOBID"], "nodes": len(set(hosts)) - 1 if hosts else None,
                "tasks": _int(env.get("OMPI_COMM_WORLD_SIZE"))}
    return {"scheduler": None, "job_id": None, "nodes": None, "tasks": None}


def _int(value: Optional[str]) -> Optional[int]:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def environment(*, world_size: int, hostnames: list[str], devices: list[str], launcher: str,
                accelerator: bool = True) -> dict[str, Any]:
    """The whole `env` block; `accelerator=False` leaves out what needs torch (a summary written for a run
    that never started)."""
    job = scheduler_job()
    return {
        **versions(),
        **git_state(),
        **(accelerator_stack() if accelerator else {}),
        "platform": platform.platform(),
        "argv": sys.argv,
        "launcher": launcher,
        "world_size": world_size,
        "hostnames": sorted(set(hostnames)),
        "devices": devices,
        "job_id": job["job_id"],
        "job": job,
    }


def sdpa_kernel(device: Any, dtype: Any, model: Any) -> str:
    """Which backend `scaled_dot_product_attention` picks for this model's shapes on this device and dtype
    (FLASH_ATTENTION, EFFICIENT_ATTENTION, CUDNN_ATTENTION or MATH): PyTorch's own dispatcher choice
    (`torch._fused_sdp_choice`, what sdpa calls), asked with empty tensors of the run's shapes."""
    import torch
    from torch.nn.attention import SDPBackend

    # as the model calls it, in training: (batch, heads, tokens, head dim) views of token-major tensors (its v is a
    # strided slice of the fused projection; no dispatcher this harness supports checks more than the last stride)
    q = torch.empty(1, model.seq_len, model.n_heads, model.head_dim, device=device, dtype=dtype).transpose(1, 2)
    kv = torch.empty(1, model.seq_len, model.kv_heads, model.head_dim, device=device, dtype=dtype).transpose(1, 2)
    q, kv = q.requires_grad_(), kv.requires_grad_()
    choice = torch._fused_sdp_choice(q, kv, kv, is_causal=True, enable_gqa=model.kv_heads != model.n_heads)
    return SDPBackend(choice).name


def kernels(cfg: Any, device: Any, compute_dtype: Any) -> dict[str, Any]:
    """The kernels the run's step used: attention (with sdpa's own choice), norm, optimizer, compilation."""
    from harness.core.registry import resolve_optimizer
    from harness.models.config import GPTConfig

    model = GPTConfig.from_section(cfg.model)
    attention: dict[str, Any] = {"choice": model.attention}
    if model.attention == "sdpa":
        try:
            attention["sdpa_kernel"] = sdpa_kernel(device, compute_dtype, model)
        except Exception as exc:  # noqa: BLE001 - a record, never a reason to fail
            attention["sdpa_kernel"], attention["sdpa_kernel_reason"] = None, f"{type(exc).__name__}: {exc}"
    return {"attention": attention, "norm_impl": model.norm_impl,
            "optimizer": resolve_optimizer(cfg.train.optimizer, cfg.backend.name, device.type),
            "compile": cfg.train.compile_backend if cfg.train.compile else None}
