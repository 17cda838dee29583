"""Config errors as one line: the field, what is wrong, and the fix (`harness: error: ...`, exit 2)."""

from __future__ import annotations

import difflib
import re
from typing import Optional

_CONVERT = re.compile(r"Value '(?P<value>.*)' of type '\w+' could not be converted to (?P<type>\w+)")
_UNKNOWN = re.compile(r"Key '(?P<key>[^']+)' not in '(?P<section>\w+)'")
_TYPES = {"Integer": "a whole number", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def _full_key(text: str) -> Optional[str]:
    match = re.search(r"full_key: (\S+)", text)
    return match.group(1) if match else None


def _known_keys(full_key: str) -> list[str]:
    """The schema's keys beside `full_key` (for a suggestion)."""
    import dataclasses

    from harness.config.schema import Config

    node: object = Config
    for part in full_key.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return []
        node = fields[part].default_factory() if fields[part].default_factory is not dataclasses.MISSING \
            else fields[part].type
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def hydra_error_line(exc: BaseException) -> str:
    """One line for Hydra's and OmegaConf's multi-line composition errors (types, unknown keys, syntax)."""
    cause = exc.__cause__ or exc
    text = str(cause)
    key = _full_key(text)
    converted = _CONVERT.search(text)
    if converted and key:
        wanted = _TYPES.get(converted.group("type"), converted.group("type").lower())
        return f"{key}={converted.group('value')}: not {wanted}; give {key}=<{wanted}>"
    unknown = _UNKNOWN.search(text)
    if unknown and key:
        section, _, leaf = key.rpartition(".")
        keys = _known_keys(key)
        near = difflib.get_close_matches(leaf, keys, n=1)
        hint = f"did you mean {'.'.join(filter(None, (section, near[0])))}?" if near else \
            f"`harness run --cfg job` lists the keys{' of ' + section if section else ''}"
        return f"{key}: unknown key; {hint}"
    if "Invalid type assigned" in text and key:
        return f"{key}: is a config section or group, not a value; set one of its keys ({key}.<key>=...)"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.startswith("See http")]
    return "; ".join(lines[:2]) if lines else type(exc).__name__
