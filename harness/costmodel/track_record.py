"""How the cost model scored on published runs of the system a prediction is for (published_scores.json, written by
benchmarks/costmodel_published.py from costmodel/published.py), so a user sees beside each prediction whether it was
validated there and in which direction it erred, instead of trusting an unvalidated number as much as a checked one.

It reads the stored summary rather than scoring the tables again: scoring them takes seconds, a prediction must not.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Optional

SCORES = Path(__file__).with_name("published_scores.json")


@functools.lru_cache(maxsize=1)
def _tables() -> tuple[dict[str, Any], ...]:
    return tuple(json.loads(SCORES.read_text())["tables"])


def not_applicable(system: Any) -> Optional[str]:
    """Why no published score speaks for this profile: its rates were measured on the machine (`harness calibrate`,
    `calibrate --from`), and the tables were scored with the shipped profiles' rates, so their errors do not carry
    over (how far the calibration reaches is reach.py's warning instead)."""
    if not getattr(system, "calibrated_on", None):
        return None
    how = getattr(system, "calibration", None) or "harness calibrate"
    return (f"system={system.name} predicts with rates measured on its machine ({how}); the published runs were "
            "scored with the shipped profiles' rates, so their errors do not carry over")


def track_record(system: Any, software: str) -> Optional[list[dict[str, Any]]]:
    """The scored tables that ran on this system profile or on its accelerator, each with `match`: what it shares
    with the prediction ("system and software", "system", "accelerator and software", "accelerator"), systems first.
    A collective's table speaks for its own system's network only, not for the accelerator elsewhere. None for a
    calibrated profile (not_applicable says why)."""
    if not_applicable(system):
        return None
    accelerator = getattr(system, "accelerator", None)
    out = []
    for table in _tables():
        same_system = table["system"] == system.name
        same_device = bool(accelerator) and table["accelerator"] == accelerator and table["scores"] != "collective"
        if not same_system and not same_device:
            continue
        match = "system" if same_system else "accelerator"
        out.append({**table, "match": match + (" and software" if table["software"] == software else "")})
    return sorted(out, key=lambda t: (not t["match"].startswith("system"), not t["match"].endswith("software")))
