"""Everything `run` checks before any process group starts: the config, the device, and whether the model
fits in the memory each rank will have (the cost model's per-device bytes against the device's, or on a
CPU against the host's available memory shared by its local ranks)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

from harness.config.checks import validate
from harness.config.checks.parallel import check_context_parallel_device
from harness.core.errors import ConfigError
from harness.core.layout import Layout
from harness.launchers.env import LaunchEnvError, RankInfo, discover, launcher_variables

GB = 1e9


@dataclass(frozen=True)
class Checked:
    """A config that passed every check, with what checking it derived: its layout and the cost model's
    estimate (computed once per command and handed on: the memory check, the run's prediction)."""

    layout: Layout
    estimate: dict[str, Any]


def check_config(cfg: Any, world_size: int, *, runs: bool = True) -> Checked:
    """Every section of `cfg` for `world_size` ranks, the cost model's included, by the code `estimate`, `plan`,
    `search` and `run` all call: ConfigError (one line) for any of them; nothing about this host. `runs=False`:
    only predicted, so a layout another framework's profile runs passes (checks.validate)."""
    from harness.costmodel.estimate import estimate

    layout = validate(cfg, world_size, runs=runs)
    return Checked(layout, estimate(cfg, layout))


def preflight(cfg: Any, world_size: int, local_ranks: int) -> Checked:
    """A valid config that can run here (check_config, then the device, kernels, data files and memory of this
    host); ConfigError (one line) otherwise."""
    checked = check_config(cfg, world_size)
    device = check_device(cfg.system.device)
    check_context_parallel_device(cfg.parallel, device)
    check_kernels(cfg, device)
    if cfg.profile.memory and device != "cuda":
        raise ConfigError(f"profile.memory=true: memory snapshots are a CUDA allocator feature "
                          f"(torch.cuda.memory._dump_snapshot) and this run uses the {device}; drop profile.memory")
    if cfg.data.kind == "megatron":
        from harness.run.data import check_indexed

        check_indexed(cfg.data, cfg.model.vocab_size, cfg.model.seq_len)
    if not cfg.launcher.skip_memory_check:
        check_memory_fit(cfg, checked.estimate, device, local_ranks)
    return checked


APEX_HOW = ("NVIDIA apex built from source with its CUDA extensions (https://github.com/NVIDIA/apex#from-source; "
            "`pip install apex` installs an unrelated web toolkit)")


def check_kernels(cfg: Any, device: str) -> None:
    """The optional fast kernels a config names are installed and can run on this device, or one line says
    how to get them (they are never import-time requirements)."""
    from harness.core.registry import resolve_optimizer
    from harness.run.environment import nvidia_apex_version

    def need(field: str, what: str, instead: str, installed: bool) -> None:
        if device != "cuda":
            raise ConfigError(f"{field}: runs on CUDA GPUs only and this run uses the {device}; use {instead}")
        if not installed:
            raise ConfigError(f"{field} needs {what}; install it, or use {instead}")

    import importlib.util

    if cfg.model.attention == "flash_attn":
        need("model.attention=flash_attn", "the flash-attn package (pip install flash-attn --no-build-isolation, "
             "https://github.com/Dao-AILab/flash-attention)", "model.attention=sdpa",
             importlib.util.find_spec("flash_attn") is not None)
        if cfg.train.precision == "fp32" and cfg.backend.get("param_dtype") in (None, "fp32"):
            raise ConfigError("model.attention=flash_attn computes in fp16/bf16 only; use train.precision=bf16 (or "
                              "model.attention=sdpa)")
    if cfg.model.norm_impl == "apex":
        need("model.norm_impl=apex", APEX_HOW, "model.norm_impl=torch", nvidia_apex_version() is not None)
    optimizer = resolve_optimizer(cfg.train.optimizer, cfg.backend.name, device)
    if optimizer == "apex_fused_adam":
        need("train.optimizer=apex_fused_adam", APEX_HOW, "train.optimizer=adamw_fused",
             nvidia_apex_version() is not None)
    if optimizer == "deepspeed_fused_adam":
        need("train.optimizer=deepspeed_fused_adam", "", "train.optimizer=adamw_fused", True)


def check_device(choice: str) -> str:
    """The device kind this host gives `system.device`; a GPU asked for and absent is a config error."""
    import torch

    xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("system.device=cuda but torch sees no GPU; use system=cpu or a CUDA/ROCm build of torch")
    if choice == "xpu" and not xpu:
        raise ConfigError("system.device=xpu but torch sees no Intel GPU; use system=cpu or an XPU build of torch")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "xpu" if xpu else "cpu"
    return choice


def available_bytes(device: str, local_ranks: int) -> tuple[float, str]:
    """Memory one rank can use, and where that figure comes from."""
    if device == "cpu":
        import psutil

        available = psutil.virtual_memory().available
        where = f"this host has {available / GB:.1f} GB available for {local_ranks} local rank(s)"
        return available / local_ranks, where
    import torch

    accelerator = getattr(torch, device)
    _, total = accelerator.mem_get_info(0) if hasattr(accelerator, "mem_get_info") else (0, 0)
    return total, f"{accelerator.get_device_name(0)} has {total / GB:.1f} GB"


def check_memory_fit(cfg: Any, est: dict[str, Any], device: str, local_ranks: int) -> None:
    """Refuse a layout whose predicted per-device memory clearly exceeds what a rank has (costmodel.memory
    REFUSE_ABOVE), before it allocates until the kernel's OOM killer ends it; warn where it may just fit."""
    from harness.costmodel.memory import REFUSE_ABOVE, memory_verdict

    predicted = est["memory_per_device_bytes"]
    have, where = available_bytes(device, local_ranks)
    need = predicted["total"]
    verdict = memory_verdict(need, have)
    if verdict in (None, "fits"):
        return
    parts = ", ".join(f"{key} {predicted[key] / GB:.1f}" for key in ("weights", "grads", "optimizer", "activations"))
    if verdict == "tight":
        print(f"harness: warning: model={cfg.model.name} is predicted to need {need / GB:.1f} GB per device ({parts}) "
              f"and {where}: within the {REFUSE_ABOVE:g}x the prediction can be off by, so the run goes ahead; "
              f"if it runs out of memory, `harness plan` lists layouts with room", file=sys.stderr)
        return
    raise ConfigError(
        f"model={cfg.model.name} needs {need / GB:.1f} GB per device ({parts}) but {where}; use a smaller model, "
        f"more ranks with sharding (backend=fsdp, or backend=deepspeed parallel.zero_stage=3), "
        f"train.activation_checkpointing=full or a smaller train.micro_batch_size (`harness plan model="
        f"{cfg.model.name} parallel.world_size=N` lists layouts that fit), or launcher.skip_memory_check=true")


def joined_ranks(cfg: Any) -> Optional[RankInfo]:
    """The ranks a launcher started that this process is one of (launcher.join), or None: start them here.

    Launcher variables and the config must agree: launcher.nproc (other than its default 1) is the ranks per node,
    or in all, that the launcher started; else the run is refused in one line naming both."""
    join = cfg.launcher.join
    if join is False:
        return None
    try:
        info = discover(os.environ)
    except LaunchEnvError as exc:
        raise ConfigError(f"{exc}, or give launcher.join=false to start launcher.nproc local ranks instead") from None
    if info is None:
        if join:
            raise ConfigError("launcher.join=true but no launcher started this process (no torchrun, srun, mpiexec "
                              "or submitit variables); start it under one, or drop launcher.join")
        return None
    nproc = cfg.launcher.nproc
    if nproc not in (1, info.local_world_size, info.world_size):
        raise ConfigError(
            f"launcher.nproc={nproc} but {info.launcher} started this process as rank {info.rank} of "
            f"{info.world_size} ({info.local_world_size} on this node, from {launcher_variables(info.launcher)}); "
            f"drop launcher.nproc to run as those ranks, or give launcher.join=false to start {nproc} local ranks")
    return info
