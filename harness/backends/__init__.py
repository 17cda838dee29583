"""Parallel backends, one module each, behind `harness.backends.base.Backend`."""

from __future__ import annotations

from typing import Any

import torch

from harness.backends.base import Backend
from harness.config import Layout


def make_backend(cfg: Any, layout: Layout, device: torch.device) -> Backend:
    """The backend named by `cfg.backend.name` (validated before launch)."""
    if cfg.backend.name == "fsdp":
        from harness.backends.fsdp import FSDPBackend

        return FSDPBackend(cfg, layout, device)
    if cfg.backend.name == "deepspeed":
        from harness.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg, layout, device)
    if cfg.backend.name == "deepspeed3d":
        from harness.backends.deepspeed3d import DeepSpeed3DBackend

        return DeepSpeed3DBackend(cfg, layout, device)
    from harness.backends.ddp import DDPBackend

    return DDPBackend(cfg, layout, device)
