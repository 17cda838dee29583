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

SCHEMA = "harness.run/1"
NOT_MEASURED_POWER = "not measured: this harness version has no power telemetry source yet"
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
) -> dict[str, Any]:
    metrics: dict[str, Any] = summarize_steps(steps)
    metrics.update(extra_metrics or {})
    for key in ("power_w", "energy_j_per_step", "tokens_per_joule"):
        if metrics.get(key) is None:
            metrics[f"{key}_reason"] = NOT_MEASURED_POWER
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
        "telemetry": {"source": None, "reason": NOT_MEASURED_POWER},
    }


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Write atomically, so a reader never sees half a summary."""
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(run_dir / "summary.json")


def hostname() -> str:
    return socket.gethostname()
