"""Parallel backends, one module each, behind `harness.backends.base.Backend`; `harness.core.registry` names them."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from harness.core.registry import backend_spec

if TYPE_CHECKING:
    import torch

    from harness.backends.base import Backend
    from harness.core.layout import Layout


def make_backend(cfg: Any, layout: Layout, device: torch.device) -> Backend:
    """The backend named by `cfg.backend.name` (validated before launch), imported on use."""
    spec = backend_spec(cfg.backend.name)
    implementation = spec.pipeline_implementation if layout.pp > 1 and spec.pipeline_implementation \
        else spec.implementation
    module, _, cls = implementation.partition(":")
    return getattr(importlib.import_module(module), cls)(cfg, layout, device)
