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
import sys
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from harness.core.errors import ConfigError
from harness.run.claim import RUN_FILES
from harness.run.rundir import read_steps_checked

SUMMARY = "summary.json"
DROPPED = ("statistics.rule", "resilience.rule", "prediction.estimate.collectives", "env.argv",
           "breakdown.top_kernels_rank0",
           "breakdown.straggler.comm_ms_by_rank", "breakdown.straggler.rule")
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
    """The summary's sections as nested dicts; config keys at the top level (they are what users sweep). A summary
    that cannot be read is a row saying so (and a warning), never the end of the report."""
    try:
        summary = _read_summary(run_dir)
    except ValueError as exc:
        print(f"harness: warning: {exc}; its row says `unreadable`", file=sys.stderr)
        return {**_read_config(run_dir), "status": "unreadable", "error": str(exc)}
    if summary is None:
        steps, _ = read_steps_checked(run_dir)
        config = _read_config(run_dir)
        return {**config, "status": "incomplete",
                "error": f"no {SUMMARY} (the run was killed); {len(steps)} step line(s) on disk"}
    row: dict[str, Any] = dict(_section(summary, "config"))
    for key in ("status", "error", "stop_reason", "finished_utc"):
        row[key] = summary.get(key)
    row["warnings"] = [w for w in summary.get("warnings") or [] if isinstance(w, str)]
    if isinstance(summary.get("statistics"), dict):
        row["statistics"] = summary["statistics"]
    row["model.params"] = _section(summary, "model").get("params")
    for section in ("layout", "metrics", "prediction", "telemetry", "env", "profile", "breakdown", "checkpoints",
                    "resilience"):
        if _section(summary, section):  # `telemetry` and `profile` are config sections too: merged,
            row[section] = {**_section(row, section), **_section(summary, section)}  # the measured value wins
    return row


def _section(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    """A section of a summary, or {} where it is missing or not a mapping (a hand-edited or foreign file)."""
    value = mapping.get(key)
    return value if isinstance(value, dict) else {}


def _read_summary(run_dir: Path) -> Optional[dict[str, Any]]:
    path = run_dir / SUMMARY
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"report: {path} is not readable JSON ({exc})") from exc
    if not isinstance(summary, dict) or not isinstance(summary.get("status"), str):
        what = f"a JSON {type(summary).__name__}" if not isinstance(summary, dict) else "an object without a status"
        raise ValueError(f"report: {path} holds {what}, not a run's summary")
    return summary


def _read_config(run_dir: Path) -> dict[str, Any]:
    """config.yaml of a run that has no summary, if it wrote one."""
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.exists() else {}
    except Exception:  # noqa: BLE001 - any unreadable config (YAML, encoding) leaves the row without config keys
        return {}
    return loaded if isinstance(loaded, dict) else {}  # type: ignore[return-value]


def read_steps(path: str) -> pd.DataFrame:
    """steps.jsonl of one run (torn lines skipped and reported by the run directory's reader)."""
    steps, _ = read_steps_checked(Path(path))
    return pd.DataFrame(steps)


def read_power(path: str, power_csv: Optional[str]) -> Optional[pd.DataFrame]:
    """power.csv of one run, or None when the run sampled no power."""
    if not power_csv or not (Path(path) / power_csv).exists():
        return None
    return pd.read_csv(Path(path) / power_csv)
