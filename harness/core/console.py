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


VERBOSE_ENV = "HARNESS_VERBOSE"
"""Set (by `harness -v ...`) to let third-party log lines, warnings and C++ logs through to the terminal."""
QUIET_NATIVE = {"KINETO_LOG_LEVEL": "6", "TORCH_CPP_LOG_LEVEL": "ERROR"}
"""Native loggers that print to the terminal on their own: the profiler's USDT/STAGE lines (libkineto levels go
up to 5) and c10's warnings (`[W ... CPUAllocator.cpp]`); set before torch loads, inherited by the ranks."""
THIRD_PARTY = ("DeepSpeed", "megatron", "lightning", "torch", "py.warnings", "hydra")


def quiet_console(verbose: bool) -> None:
    """Keep the terminal for the harness's own lines, unless `verbose`: native loggers quieted (a variable the
    user set is left alone) and Python warnings routed into logging, whose records run_logging files."""
    import logging

    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    for name, value in QUIET_NATIVE.items():
        os.environ.setdefault(name, value)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").propagate = True


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


class _OwnOrSevere:
    """The terminal's filter: the harness's own records, and anyone's errors."""

    def filter(self, record: Any) -> bool:
        import logging

        return record.name.startswith("harness") or record.levelno >= logging.ERROR


def run_logging(log_file: Any, rank: int) -> None:
    """One rank's logging: every record (the harness's, third parties' INFO lines, Python warnings) into the run's
    harness.log with the rank; the terminal gets the harness's own warnings and anyone's errors (all, verbose)."""
    import logging

    logging.captureWarnings(True)
    fmt = logging.Formatter(f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] - %(message)s")
    to_file = logging.FileHandler(log_file, delay=True)
    to_file.setFormatter(fmt)
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.setFormatter(logging.Formatter("harness: %(levelname)s: [rank " + str(rank) + "] %(message)s"))
    if verbose():
        to_terminal.setLevel(logging.INFO)
    else:
        to_terminal.setLevel(logging.WARNING)
        to_terminal.addFilter(_OwnOrSevere())
    root = logging.getLogger()
    root.handlers = [to_file, to_terminal]
    root.setLevel(logging.INFO)
    for name in THIRD_PARTY:  # libraries that bring their own handlers (DeepSpeed prints to stdout)
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [], True


def say(message: str) -> None:
    """A progress line on the terminal (stderr, so that piped stdout stays the product) and in the log."""
    import logging

    print(f"harness: {message}", file=sys.stderr, flush=True)
    logging.getLogger("harness.progress").info(message)
