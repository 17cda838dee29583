"""The two ways a command fails in one line: the user's config (exit 2) and the world outside it (exit 1)."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid configuration: the message is one line naming the field and the fix."""


class RunError(RuntimeError):
    """A failure at run time that is no fault of the config (a full disk, an unreadable input file): one line
    naming the file and what to do, exit 1."""
