"""Standard output that behaves as Unix tools do: a reader that goes away early (`harness ... | head -1`) ends
the output quietly, and a write that fails for another reason (a full device) is named as stdout's.

`guard_stdout` wraps `sys.stdout` once per process (the CLI, and every rank, which prints the live table):
after the first failed write the stream is pointed at /dev/null, so nothing else (interpreter shutdown
included) trips over it, and the run itself goes on. `stdout_error` tells the CLI whether its output was
lost for a reason other than a closed pipe, so that a command whose output is its product exits non-zero.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any, Optional


class _GuardedStream:
    """A proxy for a text stream whose writes and flushes never raise."""

    def __init__(self, stream: Any, name: str, warn: bool) -> None:
        self._stream, self._name, self._warn = stream, name, warn
        self.error: Optional[OSError] = None

    def write(self, text: str) -> int:
        if self.error is None:
            try:
                return self._stream.write(text)
            except OSError as exc:
                self._lost(exc)
        return len(text)

    def flush(self) -> None:
        if self.error is None:
            try:
                self._stream.flush()
            except OSError as exc:
                self._lost(exc)

    def _lost(self, exc: OSError) -> None:
        self.error = exc
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())  # buffered bytes and later writes go nowhere
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass
        if self._warn and exc.errno != errno.EPIPE:
            name = errno.errorcode.get(exc.errno or 0, "OSError")
            print(f"harness: warning: writing to {self._name} failed ({name}: {exc.strerror or exc}); the rest of "
                  f"its output is dropped", file=sys.stderr, flush=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def guard_stdout(*, warn: bool = False) -> None:
    """Wrap sys.stdout (once). warn: say on stderr when output is lost (a rank, whose exit code is not about its
    console); the CLI says it once at the end instead (stdout_error)."""
    if not isinstance(sys.stdout, _GuardedStream) and sys.stdout is not None:
        sys.stdout = _GuardedStream(sys.stdout, "stdout", warn)  # type: ignore[assignment]


def stdout_error() -> Optional[str]:
    """Why stdout lost output, unless it was a reader closing the pipe (which is how `head` says 'enough')."""
    stream = sys.stdout
    if isinstance(stream, _GuardedStream):
        stream.flush()
        exc = stream.error
        if exc is not None and exc.errno != errno.EPIPE:
            return f"writing to stdout failed: {errno.errorcode.get(exc.errno or 0, 'OSError')}: {exc.strerror or exc}"
    return None


def quiet_library_warnings() -> None:
    """Not the user's to act on, and repeated every step or import: DeepSpeed still calls collectives torch
    has renamed, and megatron-core notes that its optional fused kernels (TE, Apex) are not installed."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
