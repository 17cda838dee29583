"""A sweep checked whole before it touches anything (`harness run -m`, its `--dry-run`, `harness submit -- -m`).

Every point is composed and checked as its run would be checked (the layout always; where the points' ranks
run on this host, also the device, kernels, data files and memory fit), and each point's directory is looked
at, before Hydra creates, moves or writes anything: a bad point stops the sweep with exit 2 and nothing on
disk changes. The sweep directory is resolved once (its default holds the time) and handed to Hydra as given,
so the directories checked are the directories run.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from harness.core.errors import ConfigError

LOCAL_LAUNCHERS = ("basic", "local")
"""Hydra launchers whose points' ranks run on this host: the device and memory checks apply."""
JOB_LAUNCHERS = ("slurm", "local")
"""The sweep's submitit launchers (hydra/launcher=...): each point a job, sized from the point."""


@dataclass
class Point:
    """One point of a sweep: its overrides, what varies in it, and what checking it found."""

    index: int
    overrides: list[str]
    shown: str
    cfg: Optional[DictConfig] = None
    """The point's config as its run sees it (no hydra section)."""
    hydra: Optional[DictConfig] = None
    """The point's Hydra section (sweep directory, launcher)."""
    run_dir: Optional[Path] = None
    checked: Any = None
    """run.preflight.Checked: the layout and the estimate its checks derived."""
    world: int = 0
    error: Optional[str] = None
    note: str = ""


def hydra_quote(value: str) -> str:
    """A value as Hydra's override grammar reads it literally (a quoted string: any path, unicode included)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def check_override_syntax(overrides: list[str]) -> None:
    """Hydra's own parser over the command line, its multi-line lexer errors turned into one line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from harness.launchers.jobscript import printable

    parser = OverridesParser.create()
    for override in overrides:
        if not override.isprintable():
            fix = " ".join("".join(ch if ch.isprintable() else " " for ch in override).split())
            raise ConfigError(f"{printable(override)}: an override must be one line of printable characters (no "
                              f"newline, tab or control character), e.g. {fix!r}")
        try:
            parser.parse_overrides([override])
        except HydraException:
            key, sep, value = override.partition("=")
            fix = f'"{key}={hydra_quote(value)}"' if sep else f'"{hydra_quote(override)}"'  # as a shell passes it
            raise ConfigError(f"{override!r} is not an override Hydra can read (characters outside its grammar, or "
                              f"unbalanced quotes or brackets); quote the value: {fix}") from None


def check_points(overrides: list[str], *, directories: bool = True, writer: bool = True, host: bool = True,
                 sweep_dir: Optional[Path] = None) -> tuple[Optional[Path], list[Point]]:
    """(the sweep directory, every point checked): nothing is created. `directories`: also look at each point's
    directory (in use, not the harness's, a run refused by sweep.resume=false); `host`: also what this host must
    have where the points' ranks run on it (device, kernels, memory; off for --dry-run, which checks a cluster
    sweep on a login node)."""
    from harness.config.compose import compose, sweep_points

    expanded = sweep_points(overrides)
    fixed = [o for o in overrides if not o.startswith("-")]
    values: dict[str, set[str]] = {}
    for override in (o for p in expanded for o in p):
        key, _, value = override.partition("=")
        values.setdefault(key, set()).add(value)
    varying = {key for key, seen in values.items() if len(seen) > 1}
    points = []
    for i, point in enumerate(expanded):
        shown = [o for o in point if o.split("=", 1)[0] in varying] or [o for o in point if o in fixed
                                                                         and not o.startswith("hydra.")]
        pinned = [*point, f"hydra.sweep.dir={hydra_quote(str(sweep_dir))}"] if sweep_dir is not None else point
        entry = Point(i, point, " ".join(shown))
        try:
            full = compose(pinned, hydra_node=True)
            if sweep_dir is None:
                sweep_dir = Path(str(full.hydra.sweep.dir))
            with open_dict(full):
                full.hydra.job.num = i
            entry.cfg = OmegaConf.masked_copy(full, [key for key in full if key != "hydra"])
            entry.hydra = full.hydra
            entry.run_dir = sweep_dir / str(full.hydra.sweep.subdir)
            _check_point(entry, directories and writer, host)
        except ConfigError as exc:
            entry.error = str(exc)
        points.append(entry)
    return sweep_dir, points


def _check_point(point: Point, directories: bool, host: bool) -> None:
    from harness.run.preflight import check_config, joined_ranks, preflight

    cfg, hydra = point.cfg, point.hydra
    assert cfg is not None and hydra is not None and point.run_dir is not None
    launcher = str(hydra.runtime.choices.get("hydra/launcher") or "basic")
    if launcher in JOB_LAUNCHERS:
        check_launcher_strings(hydra.launcher)
    if launcher == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("hydra/launcher=slurm submits each point with sbatch, which is not on this host's PATH; run "
                          "the sweep on a Slurm login node, or hydra/launcher=local to try the same path here")
    joined = joined_ranks(cfg)
    if cfg.launcher.spawn == "srun" and joined is None:
        if "SLURM_JOB_ID" not in os.environ:
            raise ConfigError("launcher.spawn=srun: not inside a Slurm job (no SLURM_JOB_ID); run the sweep with "
                              "`harness submit <site> ... -- -m ...`, or leave launcher.spawn=local")
        point.world = int(os.environ.get("SLURM_NTASKS", "") or 0) or cfg.parallel.world_size or cfg.launcher.nproc
        point.checked = check_config(cfg, point.world)
    elif launcher in LOCAL_LAUNCHERS and host:
        point.world = joined.world_size if joined else cfg.launcher.nproc
        point.checked = preflight(cfg, point.world, joined.local_world_size if joined else cfg.launcher.nproc)
    else:  # a job on other hosts, or --dry-run: what this host has does not matter
        point.world = cfg.parallel.world_size or cfg.launcher.nproc
        point.checked = check_config(cfg, point.world)
    if directories:
        point.note = check_point_dir(point.run_dir, cfg)


def check_point_dir(run_dir: Path, cfg: DictConfig) -> str:
    """What running this point will do to its directory ('', 'skip', 'move aside'); ConfigError when the point
    must not run there."""
    from harness.config.compose import to_container
    from harness.run.claim import check_foreign, check_path_kind, holds_run

    check_path_kind(run_dir, "sweep point directory")
    if not run_dir.is_dir():
        return ""
    if in_use(run_dir):
        raise ConfigError(f"sweep point directory {run_dir} is in use by another run; wait for it to end, or give a "
                          "new hydra.sweep.dir")
    check_foreign(run_dir, cfg.launcher.allow_nonempty_dir, key="sweep point directory")
    if not holds_run(run_dir):
        return ""
    if not cfg.sweep.resume:
        raise ConfigError(f"sweep point directory {run_dir} already holds a run and sweep.resume=false; give a new "
                          "hydra.sweep.dir, or sweep.resume=true to skip finished points and rerun the others")
    return "skip" if finished_earlier(run_dir, to_container(cfg)) else "move aside"


def in_use(path: Path) -> bool:
    """Whether another process holds the directory's lock (probed, then let go at once)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # no locks on this filesystem: nothing to tell
    finally:
        os.close(fd)
    return False


def check_launcher_strings(launcher: Any) -> None:
    """Every string the sweep launcher writes into a job script (hydra.launcher.*), by the rule `harness submit`
    uses: shell lines are one printable line, directive values are words."""
    from harness.launchers.jobscript import SHELL_KEYS, SubmitError, check_script_value

    params = OmegaConf.to_container(launcher, resolve=True) if isinstance(launcher, DictConfig) else dict(launcher)
    try:
        for key, value in params.items():
            if key.startswith("_"):
                continue
            check_script_value(f"hydra.launcher.{key}", value, shell=key in SHELL_KEYS)
    except SubmitError as exc:
        raise ConfigError(str(exc)) from None


RESUME_IGNORED = ("sweep", "report", "search", "costmodel")
"""Config sections that do not change what a point measures: a point finished under other values still counts."""


def finished_earlier(run_dir: Path, config: dict[str, Any]) -> bool:
    """A point whose directory holds an ok summary of the same measured config (sweep.resume's rule, also for
    points the cluster launcher does not submit again)."""
    import json

    try:
        earlier = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(earlier, dict) and earlier.get("status") == "ok" \
        and _measured(earlier.get("config") or {}) == _measured(config)


def _measured(config: Any) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RESUME_IGNORED} if isinstance(config, dict) else {}


def first_error(points: list[Point]) -> Optional[str]:
    """One line for a sweep with bad points: the first, and how many more (--dry-run lists them all)."""
    bad = [p for p in points if p.error]
    if not bad:
        return None
    more = f" ({len(bad) - 1} more point(s) refused: --dry-run lists every point)" if len(bad) > 1 else ""
    where = f"sweep point {bad[0].index} ({bad[0].shown})" if bad[0].shown else f"sweep point {bad[0].index}"
    return f"{where}: {bad[0].error}{more}; nothing was run or changed"
