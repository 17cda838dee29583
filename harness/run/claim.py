"""Who owns a run directory, and how a run takes it.

A directory is the harness's only if the harness made it: every run directory it takes gets a marker
(`.harness-run`), every sweep directory another (`.harness-sweep`); a directory that holds a run's steps or
summary (written before the markers existed) counts too. Any other non-empty directory is the user's and is
refused (`launcher.allow_nonempty_dir=true` writes beside its files, never over them).

Everything that changes a directory (moving an earlier attempt aside, Hydra's record, the run's own files)
happens after an exclusive lock on it is taken, so a directory in use by another run is left exactly as it
was, and a refused directory receives nothing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from pathlib import Path
from typing import Iterable, Optional

from harness.core.errors import ConfigError

RUN_MARKER = ".harness-run"
SWEEP_MARKER = ".harness-sweep"
RUN_FILES = ("steps.jsonl", "summary.json")
"""A directory holding either holds a run."""
OWN_NAMES = (RUN_MARKER, "config.yaml", *RUN_FILES, "power.csv", "harness.log", ".hydra", "profile",
             "ds_config.json", ".summary-reserve")
"""Every name a run writes into its directory: beside a user's files (allow_nonempty_dir) none may exist."""
PREVIOUS = "previous-"
"""Earlier attempts of a sweep point, moved aside whole (sweep.resume)."""


def _ascii(path: Path) -> str:
    return str(path).encode("unicode_escape").decode() if not str(path).isprintable() else str(path)


def check_path_kind(path: Path, key: str) -> None:
    """A run or sweep directory is a directory, or nothing yet: not a file, nor a link to nowhere."""
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"{key}={_ascii(path)} is a symbolic link to {os.readlink(path)}, which does not exist; "
                          f"give a directory, or remove the link")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={_ascii(path)} is a file, not a directory; give a directory for the run")


def check_writable(run_dir: Path, key: str = "hydra.run.dir") -> None:
    """Refuse a directory that cannot be written (permissions, a read-only filesystem) before anything is made."""
    check_path_kind(run_dir, key)
    probe = run_dir.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{key}={_ascii(run_dir)}: {_ascii(probe)} is a file, so no directory can be made below "
                          "it; give another path")
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"run directory {_ascii(run_dir)} is not writable ({_ascii(probe)}: read-only filesystem "
                          "or no permission); give a writable hydra.run.dir")


def holds_run(run_dir: Path) -> list[str]:
    """The run files (steps, summary) a directory holds."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def is_harness_dir(path: Path, marker: str = RUN_MARKER) -> bool:
    return (path / marker).exists() or bool(holds_run(path))


def _entries(path: Path) -> list[str]:
    try:
        return sorted(p.name for p in path.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"cannot read directory {_ascii(path)} ({exc.strerror}); give another directory") from exc


def _shown(names: Iterable[str], limit: int = 4) -> str:
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_foreign(run_dir: Path, allow_nonempty: bool, key: str = "hydra.run.dir") -> None:
    """Refuse a non-empty directory the harness did not make; with allow_nonempty, refuse it only where a run's
    file names are taken."""
    entries = _entries(run_dir)
    if not entries or is_harness_dir(run_dir):
        return
    if not allow_nonempty:
        raise ConfigError(f"{key}={_ascii(run_dir)} is not empty ({_shown(entries)}) and was not made by harness; "
                          "give a new or empty directory, or launcher.allow_nonempty_dir=true to write beside "
                          "those files")
    taken = [name for name in entries if name in OWN_NAMES]
    if taken:
        raise ConfigError(f"{key}={_ascii(run_dir)} holds {_shown(taken)}, which a run would write; give a new or "
                          "empty directory (launcher.allow_nonempty_dir=true never overwrites a file)")


def check_unclaimed(run_dir: Path, allow_nonempty: bool = False) -> None:
    """A single run's directory: new, empty, or a harness directory that holds no run yet."""
    check_path_kind(run_dir, "hydra.run.dir")
    held = holds_run(run_dir)
    if held:
        raise ConfigError(f"run directory {_ascii(run_dir)} already holds a run ({', '.join(held)}); give a new "
                          "hydra.run.dir (or hydra.sweep.dir), or sweep.resume=true to skip finished sweep points")
    check_foreign(run_dir, allow_nonempty)


class DirLock:
    """An exclusive lock on a directory (flock on the directory itself, so no file is left behind), held for a
    run's or a sweep's lifetime. A second run or sweep pointed at it is refused, not interleaved.

    A filesystem without flock (some parallel filesystems' mounts) runs without the lock, saying so once."""

    def __init__(self, path: Path, what: str = "run directory", key: str = "hydra.run.dir") -> None:
        self.path, self.what, self.key = path, what, key
        self._fd: Optional[int] = None

    def __enter__(self) -> "DirLock":
        check_path_kind(self.path, self.key)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {self.what} {_ascii(self.path)} ({exc.strerror}); give a writable "
                              f"{self.key}") from exc
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            other = "sweep" if self.what.startswith("sweep") else "run"
            raise ConfigError(f"{self.what} {_ascii(self.path)} is in use by another {other}; give a new "
                              f"{self.key}, or wait for that {other} to end") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            print(f"harness: warning: {self.path}: the filesystem does not support locks "
                  f"({errno.errorcode.get(exc.errno or 0, '')}); two runs into it would not be told apart",
                  file=sys.stderr)
            return self
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunDirLock(DirLock):
    """A run directory taken by this run: locked first, then checked (a racing run cannot pass both), then
    marked as the harness's. `sweep_point`: a directory holding an earlier attempt is accepted (the caller
    moves it aside under this lock)."""

    def __init__(self, run_dir: Path, *, allow_nonempty: bool = False, sweep_point: bool = False) -> None:
        super().__init__(run_dir)
        self.run_dir = run_dir
        self.allow_nonempty, self.sweep_point = allow_nonempty, sweep_point

    def __enter__(self) -> "RunDirLock":
        super().__enter__()
        try:
            if self.sweep_point:
                check_foreign(self.run_dir, self.allow_nonempty, key="sweep point directory")
            else:
                check_unclaimed(self.run_dir, self.allow_nonempty)
            if not os.access(self.run_dir, os.W_OK):
                raise ConfigError(f"run directory {_ascii(self.run_dir)} is not writable; give a writable "
                                  "hydra.run.dir")
        except ConfigError:
            self.release()
            raise
        return self

    def mark(self) -> None:
        """Say, in the directory itself, that the harness made it (before any other file of the run)."""
        (self.run_dir / RUN_MARKER).touch()


def move_aside(run_dir: Path) -> Optional[Path]:
    """Move every earlier file and folder of a run directory (Hydra's record and the traces included) into
    `previous-<n>/`, never deleting one; None when there was nothing to move."""
    entries = [p for p in run_dir.iterdir() if not p.name.startswith(PREVIOUS)] if run_dir.is_dir() else []
    if not holds_run(run_dir) and not any(p.name in OWN_NAMES and p.name != RUN_MARKER for p in entries):
        return None
    n = 1
    while (run_dir / f"{PREVIOUS}{n}").exists():
        n += 1
    aside = run_dir / f"{PREVIOUS}{n}"
    aside.mkdir()
    for path in entries:
        path.rename(aside / path.name)
    return aside


class SweepLock(DirLock):
    """The sweep directory, locked for the whole sweep: a second sweep into it is refused before it changes a
    file. Refused too: a non-empty directory that is not a harness sweep (or run tree)."""

    def __init__(self, sweep_dir: Path) -> None:
        super().__init__(sweep_dir, what="sweep directory", key="hydra.sweep.dir")

    def __enter__(self) -> "SweepLock":
        check_sweep_dir(self.path)
        super().__enter__()
        (self.path / SWEEP_MARKER).touch()
        return self


def check_sweep_dir(sweep_dir: Path) -> None:
    """A sweep directory is new, empty, marked as a harness sweep, or (before the marker existed) holds harness
    run directories."""
    check_path_kind(sweep_dir, "hydra.sweep.dir")
    entries = _entries(sweep_dir)
    if not entries or (sweep_dir / SWEEP_MARKER).exists():
        return
    if any(is_harness_dir(sweep_dir / name) for name in entries if (sweep_dir / name).is_dir()):
        return
    raise ConfigError(f"hydra.sweep.dir={_ascii(sweep_dir)} is not empty ({_shown(entries)}) and is not a harness "
                      "sweep; give a new or empty directory")
