"""How the cost model scored on published runs of the system a prediction is for (published_scores.json, written by
benchmarks/costmodel_published.py from costmodel/published.py), so a user sees beside each prediction whether it was
validated there and in which direction it erred, instead of trusting an unvalidated number as much as a checked one.

It reads the stored summary rather than scoring the tables again: scoring them takes seconds, a prediction must not.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

SCORES = Path(__file__).with_name("published_scores.json")


@functools.lru_cache(maxsize=1)
def _tables() -> tuple[dict[str, Any], ...]:
    return tuple(json.loads(SCORES.read_text())["tables"])


def track_record(system: Any, software: str) -> list[dict[str, Any]]:
    """The scored tables that ran on this system profile or on its accelerator, each with `match`: what it shares
    with the prediction ("system and software", "system", "accelerator and software", "accelerator"), systems first.
    A collective's table speaks for its own system's network only, not for the accelerator elsewhere."""
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
