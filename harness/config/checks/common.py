"""The two shapes of check every section uses: a value from a set of choices, and a lower bound."""

from __future__ import annotations

from typing import Any

from harness.core.errors import ConfigError


def choice(value: str, choices: Any, key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value}: unknown value; choose one of: {', '.join(choices)}")


def at_least(section: Any, prefix: str, keys: tuple[str, ...], low: float, what: str) -> None:
    """Each key of `section` (a config node or its plain schema dataclass: `plan` checks thousands of layouts and
    skips OmegaConf's per-access cost) is unset or at least `low`."""
    for key in keys:
        value = getattr(section, key)
        if value is not None and value < low:
            raise ConfigError(f"{prefix}.{key}={value}: must be {what}")
