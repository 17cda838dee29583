"""Run directories into one pandas DataFrame: a row per run, every config key and result flattened.

Config keys keep the names users type as overrides (`train.micro_batch_size`, `backend.name`);
results keep their summary.json section (`metrics.tokens_per_s`, `prediction.iter_time_ms`,
`layout.world_size`). A directory whose run was killed before its summary (steps.jsonl only) is a
row with status `incomplete`, never dropped.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from harness.config.errors import ConfigError
from harness.run.rundir import RUN_FILES, read_steps_checked

SUMMARY = "summary.json"
DROPPED = ("prediction.estimate.collectives", "env.argv", "breakdown.ranks", "breakdown.top_kernels_rank0")
"""Long lists that make runs.csv unreadable and no view needs."""


def find_run_dirs(paths: list[str]) -> list[Path]:
    """Every run directory at or below each path or glob (`multirun/` trees and `results/runs/` alike),
    in path order. A run moved aside by sweep.resume (`previous-<n>/`) is an older attempt: left out."""
    found: dict[Path, None] = {}
    for pattern in paths:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise ConfigError(f"report: {pattern} matches no file or directory; give run or sweep directories")
        for match in map(Path, matches):
            root = match.parent if match.is_file() else match
            for directory in _run_dirs_below(root):
                found[directory] = None
    if not found:
        raise ConfigError(f"report: no run directory (one holding {' or '.join(RUN_FILES)}) under "
                          f"{', '.join(paths)}; point at results/runs/... or a sweep directory")
    return sorted(found)


def _run_dirs_below(root: Path) -> list[Path]:
    if any((root / name).is_file() for name in RUN_FILES):
        return [root]
    return sorted({p.parent for name in RUN_FILES for p in root.rglob(name)
                   if not any(part.startswith("previous-") for part in p.relative_to(root).parts)})


def load_runs(paths: list[str]) -> pd.DataFrame:
    """One row per run directory, with a short `run` label (its path below the common root)."""
    dirs = find_run_dirs(paths)
    rows = [_row(d) for d in dirs]
    frame = pd.json_normalize(rows, sep=".")
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith(DROPPED)])
    common = Path(os.path.commonpath([str(d) for d in dirs])) if len(dirs) > 1 else dirs[0].parent
    frame.insert(0, "run", [str(d.relative_to(common)) for d in dirs])
    frame.insert(1, "path", [str(d) for d in dirs])
    return frame


def _row(run_dir: Path) -> dict[str, Any]:
    """The summary's sections as nested dicts; config keys at the top level (they are what users sweep)."""
    summary = _read_summary(run_dir)
    if summary is None:
        steps, _ = read_steps_checked(run_dir)
        config = _read_config(run_dir)
        return {**config, "status": "incomplete",
                "error": f"no {SUMMARY} (the run was killed); {len(steps)} step line(s) on disk"}
    row: dict[str, Any] = dict(summary.get("config") or {})
    for key in ("status", "error", "stop_reason"):
        row[key] = summary.get(key)
    row["model.params"] = (summary.get("model") or {}).get("params")
    for section in ("layout", "metrics", "prediction", "telemetry", "env", "profile", "breakdown"):
        if summary.get(section) is not None:  # `telemetry` and `profile` are config sections too: merged,
            row[section] = {**(row.get(section) or {}), **summary[section]}  # the measured value wins
    return row


def _read_summary(run_dir: Path) -> Optional[dict[str, Any]]:
    path = run_dir / SUMMARY
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"report: {path} is not readable JSON ({exc}); move it aside or fix it") from exc


def _read_config(run_dir: Path) -> dict[str, Any]:
    """config.yaml of a run that has no summary, if it wrote one."""
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    if not path.exists():
        return {}
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]


def read_steps(path: str) -> pd.DataFrame:
    """steps.jsonl of one run (torn lines skipped and reported by the run directory's reader)."""
    steps, _ = read_steps_checked(Path(path))
    return pd.DataFrame(steps)


def read_power(path: str, power_csv: Optional[str]) -> Optional[pd.DataFrame]:
    """power.csv of one run, or None when the run sampled no power."""
    if not power_csv or not (Path(path) / power_csv).exists():
        return None
    return pd.read_csv(Path(path) / power_csv)
