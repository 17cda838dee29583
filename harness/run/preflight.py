"""Everything `run` checks before any process group starts: the config, the device, and whether the model
fits in the memory each rank will have (the cost model's per-device bytes against the device's, or on a
CPU against the host's available memory shared by its local ranks)."""

from __future__ import annotations

from typing import Any

from harness.config.checks import Layout, validate
from harness.config.errors import ConfigError

GB = 1e9


def preflight(cfg: Any, world_size: int, local_ranks: int) -> Layout:
    """The layout of a valid config that can run here; ConfigError (one line) otherwise."""
    layout = validate(cfg, world_size)
    device = check_device(cfg.system.device)
    if cfg.profile.memory and device != "cuda":
        raise ConfigError(f"profile.memory=true: memory snapshots are a CUDA allocator feature "
                          f"(torch.cuda.memory._dump_snapshot) and this run uses the {device}; drop profile.memory")
    if cfg.data.kind == "megatron":
        from harness.run.data import check_indexed

        check_indexed(cfg.data, cfg.model.vocab_size, cfg.model.seq_len)
    if not cfg.launcher.skip_memory_check:
        check_memory_fit(cfg, layout, device, local_ranks)
    return layout


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


def check_memory_fit(cfg: Any, layout: Layout, device: str, local_ranks: int) -> None:
    """Refuse a layout whose predicted per-device memory exceeds what a rank has, before it allocates
    until the kernel's OOM killer ends it."""
    from harness.costmodel.estimate import estimate

    try:
        predicted = estimate(cfg, layout)["memory_per_device_bytes"]
    except Exception:  # noqa: BLE001 - a cost-model gap must not block a run; the summary reports it
        return
    have, where = available_bytes(device, local_ranks)
    need = predicted["total"]
    if have <= 0 or need <= have:
        return
    parts = ", ".join(f"{key} {predicted[key] / GB:.1f}" for key in ("weights", "grads", "optimizer", "activations"))
    raise ConfigError(
        f"model={cfg.model.name} needs {need / GB:.1f} GB per device ({parts}) but {where}; use a smaller model, "
        f"more ranks with sharding (backend=fsdp, or backend=deepspeed parallel.zero_stage=3), "
        f"train.activation_checkpointing=full or a smaller train.micro_batch_size (`harness plan model="
        f"{cfg.model.name} parallel.world_size=N` lists layouts that fit), or launcher.skip_memory_check=true")
