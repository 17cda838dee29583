"""The checks that run before any process starts, and the layout they derive.

`validate` checks what the schema's types cannot express (ranges, divisibility, files, what the
chosen backend can do) and raises `ConfigError` with one line naming the field and the fix. The
backends' abilities come from `harness.core.registry`, the model's own rules from
`harness.models.config.GPTConfig.check`. Nothing here imports torch: the cost model and the CLI use it
before any heavy import.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

from omegaconf import DictConfig, OmegaConf

from harness.config.checks.backends import check_backend_options, check_deepspeed, check_fsdp
from harness.config.checks.checkpoint import check_checkpoint
from harness.config.checks.common import choice
from harness.config.checks.data import check_data
from harness.config.checks.parallel import (
    check_context_parallel,
    check_parallel,
    check_pipeline_schedule,
    check_world,
    checked_global_batch,
)
from harness.config.checks.sections import check_launcher, check_report, check_system, check_telemetry, check_train
from harness.config.schema import Config
from harness.core.errors import ConfigError
from harness.core.layout import Layout, profile_window
from harness.core.registry import BACKENDS, FRAMEWORK_LAYOUTS, FrameworkLayouts, backend_spec
from harness.models.config import GPTConfig, ModelConfigError

AnyConfig = Union[DictConfig, Config]


def check_model(m: Any) -> GPTConfig:
    """The model section as the model's own config, held to the model's own rules."""
    model = GPTConfig.from_section(m)
    try:
        model.check(prefix="model.")
    except ModelConfigError as exc:
        raise ConfigError(str(exc)) from exc
    return model


def check_finite(node: Any, prefix: str = "") -> None:
    """No field holds nan or inf: a learning rate of nan trains nothing and a bandwidth of inf predicts nothing."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        name = f"{prefix}.{key}" if prefix and isinstance(key, str) else f"{prefix}[{key}]" if prefix else str(key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}={value}: must be a finite number")
        check_finite(value, name)


def other_framework(cfg: AnyConfig) -> Optional[FrameworkLayouts]:
    """The layouts of the other framework whose run the config asks the cost model about (`costmodel.software`
    names a profile that no harness backend runs: megatron-lm, nanotron, ...); None for a run of the harness's own
    backend."""
    return FRAMEWORK_LAYOUTS.get(getattr(getattr(cfg, "costmodel", None), "software", None))


def validate(cfg: AnyConfig, world_size: int, *, runs: bool = True) -> Layout:
    """Check the whole config for a job of `world_size` ranks and derive its layout. `runs=False` checks a layout
    only to predict it: where the config names another framework's profile (other_framework), the interleaved
    stages and context parallelism that framework runs itself (core.registry.FRAMEWORK_LAYOUTS) pass although the
    harness's backend cannot run them (Megatron-LM's CP beside interleaved stages); everything else, the backend's
    ZeRO stages and precisions among it, holds as for a run. `harness run` checks what the backend itself runs."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    check_finite(OmegaConf.to_container(node, resolve=True))
    p, t, backend = cfg.parallel, cfg.train, cfg.backend.name
    choice(backend, BACKENDS, "backend")
    model = check_model(cfg.model)
    check_launcher(cfg.launcher)
    check_system(cfg.system)
    check_train(t, model.n_layers, backend)
    check_backend_options(cfg.backend)
    framework = None if runs else other_framework(cfg)  # what it runs beyond the harness's backend
    check_parallel(backend, model, p, t.precision, framework)
    check_context_parallel(backend, model, p, cfg.system.device, framework)
    if backend_spec(backend).deepspeed_engine:
        check_deepspeed(cfg.backend, p, t.precision, cfg.system.device)
    dp = check_world(world_size, p)
    if backend_spec(backend).shardings:
        check_fsdp(cfg.backend, cfg.system.devices_per_node, dp * p.cp, t.precision, p.tp, cfg.system.device)
    global_batch = checked_global_batch(t, dp)
    if "pp_schedule" in backend_spec(backend).options:
        check_pipeline_schedule(cfg.backend, p, global_batch // (t.micro_batch_size * dp), t.compile,
                                 cfg.system.device)
    check_data(cfg.data, model.seq_len, model.vocab_size)
    check_telemetry(cfg.telemetry)
    profile_window(cfg.profile, t.warmup_steps, t.warmup_steps + t.steps)
    check_report(cfg.report)
    layout = Layout(world_size=world_size, tp=p.tp, pp=p.pp, dp=dp, zero_stage=p.zero_stage,
                    micro_batch_size=t.micro_batch_size, global_batch_size=global_batch,
                    grad_accum=global_batch // (t.micro_batch_size * dp), cp=p.cp)
    if getattr(cfg, "checkpoint", None) is not None:  # configs composed before the section existed have none
        check_checkpoint(cfg, layout)
    return layout


def compute_precision(cfg: Any) -> str:
    """The dtype the blocks compute in, which picks the peak MFU divides by: FSDP's param_dtype may differ
    from train.precision."""
    if "param_dtype" in backend_spec(cfg.backend.name).options and cfg.backend.param_dtype is not None:
        return cfg.backend.param_dtype
    return cfg.train.precision


def reduce_precision(cfg: Any) -> str:
    """The dtype FSDP reduces gradients in: backend.reduce_dtype where the backend has it, fp32 by default (the
    run's MixedPrecisionPolicy and the cost model's bytes read it here)."""
    if "reduce_dtype" in backend_spec(cfg.backend.name).options and cfg.backend.reduce_dtype is not None:
        return cfg.backend.reduce_dtype
    return "fp32"
