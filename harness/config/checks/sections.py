"""The run's own sections: train, launcher, telemetry, system and report."""

from __future__ import annotations

from typing import Any

from harness.config.checks.common import at_least, choice
from harness.config.schema import (
    LauncherConfig,
    TelemetryConfig,
    TrainConfig,
)
from harness.core.errors import ConfigError
from harness.core.registry import (
    CHECKPOINTING,
    NIC_PATHS,
    OPTIMIZERS,
    PRECISIONS,
    REPORT_VIEWS,
    backend_spec,
)
from harness.launchers.env import GPU_ORDERS

DEVICES = ("auto", "cpu", "cuda", "xpu")


TELEMETRY_SOURCES = ("auto", "nvml", "amdsmi", "rocm-smi", "rapl", "none")


COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")


def check_train(t: TrainConfig, n_layers: int, backend: str) -> None:
    """Step counts, batch sizes, optimizer settings, checkpointing granularity, compilation, fault injection."""
    choice(t.precision, PRECISIONS, "train.precision")
    choice(t.activation_checkpointing, CHECKPOINTING, "train.activation_checkpointing")
    at_least(t, "train", ("steps",), 1, "at least 1 timed step")
    at_least(t, "train", ("micro_batch_size", "global_batch_size"), 1, "at least 1")
    at_least(t, "train", ("warmup_steps", "weight_decay", "grad_clip"), 0, "0 or more")
    if t.lr <= 0:
        raise ConfigError(f"train.lr={t.lr}: must be positive")
    if backend_spec(backend).builds_own_stages and (t.checkpoint_every_n is not None or t.compile):
        raise ConfigError(f"train.checkpoint_every_n / train.compile: backend={backend} builds its pipeline "
                          "stages itself (checkpointing per stage layer); leave them unset")
    if t.checkpoint_every_n is not None:
        if t.activation_checkpointing != "selective":
            raise ConfigError(f"train.checkpoint_every_n={t.checkpoint_every_n} needs "
                              "train.activation_checkpointing=selective")
        if not 1 <= t.checkpoint_every_n <= n_layers:
            raise ConfigError(f"train.checkpoint_every_n={t.checkpoint_every_n}: "
                              f"choose 1..model.n_layers={n_layers}")
    choice(t.compile_backend, COMPILE_BACKENDS, "train.compile_backend")
    choice(t.optimizer, OPTIMIZERS, "train.optimizer")
    deepspeed = backend_spec(backend).deepspeed_engine
    if t.optimizer == "deepspeed_fused_adam" and not deepspeed:
        raise ConfigError(f"train.optimizer=deepspeed_fused_adam is built by DeepSpeed's engine; backend={backend} "
                          "builds torch's: use adamw_fused (or apex_fused_adam), or backend=deepspeed")
    if t.optimizer == "apex_fused_adam" and deepspeed:
        raise ConfigError(f"train.optimizer=apex_fused_adam: backend={backend} builds its optimizer from the DeepSpeed "
                          "config; use deepspeed_fused_adam (its own fused Adam) or adamw_fused")
    total = t.warmup_steps + t.steps
    if t.fault_inject_oom_step is not None and not 0 <= t.fault_inject_oom_step < total:
        raise ConfigError(f"train.fault_inject_oom_step={t.fault_inject_oom_step}: choose a step in 0..{total - 1}")
    if t.fault_inject_crash_step is not None and not 0 <= t.fault_inject_crash_step < total:
        raise ConfigError(f"train.fault_inject_crash_step={t.fault_inject_crash_step}: choose a step in 0..{total - 1}")
    if t.fault_inject_slow_ms < 0:
        raise ConfigError(f"train.fault_inject_slow_ms={t.fault_inject_slow_ms}: give 0 (off) or a delay in ms")


def check_launcher(launcher: LauncherConfig) -> None:
    choice(launcher.gpu_order, GPU_ORDERS, "launcher.gpu_order")
    choice(launcher.spawn, ("local", "srun"), "launcher.spawn")
    at_least(launcher, "launcher", ("nproc",), 1, "at least 1 (ranks to start)")
    at_least(launcher, "launcher", ("omp_num_threads",), 1, "at least 1 thread per rank (or unset: cores / ranks)")
    at_least(launcher, "launcher", ("pg_timeout_s",), 1, "at least 1 second (a collective's timeout)")
    at_least(launcher, "launcher", ("max_restarts",), 0, "0 (a failed rank ends the job) or more restarts")
    for key in ("monitor_interval_s",):
        if launcher[key] <= 0:
            raise ConfigError(f"launcher.{key}={launcher[key]}: must be a positive number of seconds")
    at_least(launcher, "launcher", ("watchdog_s", "walltime_margin_s"), 0, "0 or more seconds")


def check_telemetry(t: TelemetryConfig) -> None:
    choice(t.source, TELEMETRY_SOURCES, "telemetry.source")
    if t.interval_ms < 10:
        raise ConfigError(f"telemetry.interval_ms={t.interval_ms}: sample at most every 10 ms "
                          "(NVML's counters move every ~100 ms; faster only costs CPU)")
    if t.idle_s < 0:
        raise ConfigError(f"telemetry.idle_s={t.idle_s}: must be 0 (skip idle power) or more")


def check_system(system: Any) -> None:
    choice(system.device, DEVICES, "system.device")
    if system.peak_tflops is not None and not system.peak_tflops_source:
        raise ConfigError("system.peak_tflops is set without system.peak_tflops_source; say where it was measured")
    if system.nic_gpu_path is not None:
        choice(system.nic_gpu_path, NIC_PATHS, "system.nic_gpu_path")
    at_least(system, "system", ("devices_per_node", "coll_channels"), 1, "at least 1")
    at_least(system, "system", ("peak_tflops", "memory_gb"), 1e-9, "positive")


def check_report(r: Any) -> None:
    for view in r.views:
        choice(view, REPORT_VIEWS, "report.views")
    if r.baseline is not None and "=" not in r.baseline:
        raise ConfigError(f"report.baseline={r.baseline}: give KEY=VALUE, e.g. report.baseline=backend.name=fsdp")
