"""The run directory: `config.yaml`, `steps.jsonl` (one line per finished step), `summary.json`.

Rank 0 writes; every step line is flushed as the step ends, so a crash keeps every finished step.
The launching process writes `summary.json` itself when no rank could (a rank killed, a launch
that failed), from the steps already on disk.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from harness.metrics import summarize_steps
from harness.telemetry.summary import NO_REPORT, energy_metrics

SCHEMA = "harness.run/1"
ENERGY_KEYS = ("power_w", "idle_power_w", "energy_j_per_step", "tokens_per_joule", "tflops_per_watt")
NOT_PREDICTED = "not predicted: the job ended before a rank ran the cost model (invalid config or failed launch)"


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")


class StepLog:
    """Appends one JSON object per finished step to `steps.jsonl`."""

    def __init__(self, run_dir: Path) -> None:
        self._file = open(run_dir / "steps.jsonl", "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_steps(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "steps.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for package in ("torch", "lightning", "deepspeed", "megatron-core", "hydra-core", "harness"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def environment(*, world_size: int, hostnames: list[str], devices: list[str], launcher: str) -> dict[str, Any]:
    return {
        **versions(),
        "platform": platform.platform(),
        "argv": sys.argv,
        "launcher": launcher,
        "world_size": world_size,
        "hostnames": sorted(set(hostnames)),
        "devices": devices,
        "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID") or os.environ.get("LSB_JOBID"),
    }


def build_summary(
    *,
    status: str,
    error: Optional[str],
    config: dict[str, Any],
    layout: dict[str, int],
    model: dict[str, Any],
    steps: list[dict[str, Any]],
    env: dict[str, Any],
    extra_metrics: Optional[dict[str, Any]] = None,
    stop_reason: Optional[str] = None,
    prediction: Optional[dict[str, Any]] = None,
    prediction_reason: str = NOT_PREDICTED,
    telemetry: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """`telemetry` is the block from harness.telemetry.summary.telemetry_block (None: no rank reported)."""
    metrics: dict[str, Any] = summarize_steps(steps)
    metrics.update(energy_metrics(steps, layout.get("world_size", 1)))
    metrics.update(extra_metrics or {})
    telemetry = telemetry or {"source": None, "reason": NO_REPORT}
    metrics["idle_power_w"] = telemetry.get("idle_power_w")
    for key in ENERGY_KEYS:
        if metrics.get(key) is None:
            metrics[f"{key}_reason"] = _energy_reason(key, telemetry)
    return {
        "schema": SCHEMA,
        "status": status,
        "stop_reason": stop_reason or ("completed" if status == "ok" else "failed"),
        "error": error,
        "config": config,
        "env": env,
        "layout": layout,
        "model": model,
        "metrics": metrics,
        "prediction": prediction,
        "prediction_reason": None if prediction is not None else prediction_reason,
        "telemetry": telemetry,
    }


def _energy_reason(key: str, telemetry: dict[str, Any]) -> str:
    if telemetry.get("reason"):
        return f"not measured: {telemetry['reason']}"
    if key == "idle_power_w":
        return "not measured: telemetry.idle_s=0 or no device reported power while idle"
    return "not measured: some device reported neither energy nor power (see telemetry.devices)"


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Write atomically, so a reader never sees half a summary."""
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(run_dir / "summary.json")


def hostname() -> str:
    return socket.gethostname()
