"""`harness run`: a real `hydra.main` application, so `-m` sweeps, `hydra.run.dir=...`,
`hydra.sweep.dir=...` and `--cfg job` behave as Hydra users expect.

A single run is composed and checked (`preflight`) before Hydra creates its directory, so a config
error leaves nothing behind and touches nothing that was there. A sweep runs every point and exits
non-zero, naming them, when any point failed.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from harness.core.errors import ConfigError, RunError
from harness.run.stopping import Interrupted, Terminated, stop_on_signals
from harness.run.sweep import hydra_quote

if TYPE_CHECKING:
    from harness.launchers.env import RankInfo

USAGE = """usage: harness run [overrides ...] [-m] [hydra options]

Train a GPT for a bounded number of steps and write a run directory (results/runs/<date>/<time>-<name>/).

  harness run                                   tiny GPT, 1 rank, ddp, CPU
  harness run launcher.nproc=2 backend=fsdp     2 local ranks, FSDP2
  harness run -m train.micro_batch_size=1,2,4   a sweep, one run directory per point (sweep.resume=true skips
                                                finished points of an earlier sweep in the same hydra.sweep.dir)
  harness run --cfg job                         print the composed config and stop
  harness run -m +experiment=NAME --dry-run     list a sweep's points, each checked, without running any
  harness run -m ... --cfg job                  print the composed config of every point of a sweep
  harness run hydra.run.dir=DIR ...             write into DIR (it must not hold another run)

Config groups: model, backend, data, system, experiment; every key is an override (`--cfg job` lists them).
Hydra's own help: harness run --hydra-help"""

_sweep_points: list[tuple[str, str]] = []
"""(run directory, status) of each sweep point this process ran."""
_prechecked: dict[Any, Any] = {}
"""What the command's checks derived (run.preflight.Checked: layout, estimate), by sweep point number ("run" for a
single run): not derived twice."""
_output_subdir: Optional[str] = ".hydra"
"""Where Hydra's record of a run goes (the user's hydra.output_subdir; Hydra itself is told null)."""


def _fail(message: str, code: int = 2) -> None:
    print(f"harness: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_command(args: list[str]) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from harness.config.compose import check_group_overrides, searchpath_overrides
    from harness.config.errors import hydra_error_line
    from harness.config.schema import register_schema
    from harness.run.sweep import check_override_syntax

    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    multirun = any(a in ("-m", "--multirun") for a in args)
    options, overrides = _split_hydra_args(args)
    info_only = any(a.startswith(("--cfg", "-c", "--info", "--hydra-help", "--resolve", "--package")) for a in args)
    info: Optional[RankInfo] = None
    sweep_dir: Optional[Path] = None
    try:
        check_override_syntax(overrides)
        if "--dry-run" in args or (multirun and info_only):
            return _list_points(args)
        check_group_overrides([a for a in overrides if not a.startswith("hydra")])
        if multirun and not info_only:
            info, sweep_dir = _check_sweep(overrides)
        elif not info_only:
            info = _preflight_single(overrides)
    except ConfigError as exc:
        _end(info, f"harness: error: {exc}", 2)
    except RunError as exc:
        _end(info, f"harness: error: {exc}", 1)
    register_schema()
    private = _non_writer_overrides(info)  # a non-writer rank's directories win over the user's
    if private:
        overrides = [a for a in overrides
                     if not a.startswith(("hydra.run.dir=", "hydra.sweep.dir=", "hydra.output_subdir="))]
    elif sweep_dir is not None:
        overrides = [*overrides, f"hydra.sweep.dir={hydra_quote(str(sweep_dir))}"]
    global _output_subdir
    _output_subdir = _record_subdir(overrides)
    # Hydra's record (.hydra/) is written by the task once it holds the run directory (_write_hydra_record).
    sys.argv = ["harness run", *options, *searchpath_overrides(), *private, *overrides, "hydra.output_subdir=null"]
    code = 0
    stop_on_signals()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises what escapes it, instead of printing it
    try:
        with _sweep_lock(sweep_dir, info):
            _hydra_app()
        code = _sweep_result() if multirun else 0
    except ConfigError as exc:  # the sweep directory is taken
        _end(info, f"harness: error: {exc}", 2)
    except (HydraException, OmegaConfBaseException) as exc:  # composing (--cfg, --info) as Hydra reports it
        _end(info, f"harness: error: {hydra_error_line(exc)}", 2)
    except OSError as exc:  # Hydra's own files (multirun.yaml) on a full or failing disk
        from harness.run.rundir import os_error

        _end(info, f"harness: error: writing {getattr(exc, 'filename', None) or 'the sweep directory'} failed "
                   f"({os_error(exc)}); free some space or give another hydra.sweep.dir", 1)
    except (Interrupted, Terminated, KeyboardInterrupt) as exc:
        code = _interrupted(exc, multirun)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    if info is None:
        return code
    _end(info, None, code)
    return code


def _sweep_lock(sweep_dir: Optional[Path], info: Optional[RankInfo]) -> Any:
    """The sweep directory's lock for the whole sweep (the writing rank's; other ranks write nothing)."""
    import contextlib

    from harness.run.claim import SweepLock

    if sweep_dir is None or (info is not None and info.rank != 0):
        return contextlib.nullcontext()
    return SweepLock(sweep_dir)


def _record_subdir(overrides: list[str]) -> Optional[str]:
    """Where the user wants Hydra's record (hydra.output_subdir, default .hydra; null: none)."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.output_subdir=")]
    value = given[-1].strip("'\"") if given else ".hydra"
    return None if value in ("null", "None", "") else value


def _interrupted(exc: BaseException, multirun: bool) -> int:
    """Ctrl-C or SIGTERM: the run (or the sweep's current point) stopped with its steps and summary kept (status
    interrupted); no further point runs. Exit 128 + the signal's number, as a shell reports it."""
    signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGTERM if isinstance(exc, Terminated) \
        else signal.SIGINT
    run_dir = exc.run_dir if isinstance(exc, Interrupted) else None
    line = f"harness: error: interrupted by {signal.Signals(signum).name}"
    if run_dir:
        line += f" during {run_dir} (its finished steps kept, status interrupted)"
    if multirun:
        done = sum(status in ("ok", "skipped") for _, status in _sweep_points)
        line += f"; {done} sweep point(s) finished, no further point run; run the same command again to continue " \
                "(sweep.resume=true skips the finished ones)"
    print(line, file=sys.stderr)
    return 128 + signum


HYDRA_VALUE_OPTIONS = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name", "-cd",
                       "--config-dir", "--experimental-rerun"}
INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def _split_hydra_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra's options with their values, overrides): argparse takes no override after an option's position,
    so the harness's own overrides are placed after every option."""
    options, overrides = [], []
    pending = False
    for arg in args:
        if pending:
            options.append(arg)
            pending = False
        elif arg.startswith("-"):
            options.append(arg)
            pending = arg in HYDRA_VALUE_OPTIONS
        elif options and options[-1] in ("-i", "--info") and arg in INFO_TOPICS:
            options.append(arg)
        else:
            overrides.append(arg)
    return options, overrides


def _list_points(args: list[str]) -> int:
    """`--dry-run`: every point of the run or sweep, checked for its layout as `run` would (without this
    host's device and memory where the points run elsewhere, so a cluster sweep can be checked on a login node),
    and what running it would do to its directory; `-m --cfg job`: every point's composed config. Nothing is
    run, no directory is made. Exit 2 when a point is invalid."""
    from omegaconf import OmegaConf

    from harness.run.sweep import check_points

    options, overrides = _split_hydra_args(args)
    cfg_part = next((options[i + 1] for i, o in enumerate(options[:-1]) if o in ("-c", "--cfg")), None)
    _, points = check_points(overrides, directories=cfg_part is None, host=False)
    if cfg_part is None:
        print(f"harness: {len(points)} point(s); nothing run (drop --dry-run to run them)")
    for point in points:
        cfg = point.cfg
        if cfg_part is not None and cfg is not None:
            section = point.hydra if cfg_part == "hydra" else cfg
            print(f"# point {point.index} of {len(points)}: {point.shown}\n{OmegaConf.to_yaml(section)}")
            continue
        if point.error:
            check = f"error: {point.error}"
        else:
            layout = point.checked.layout
            check = (f"ok: {point.world} rank(s), tp {layout.tp} x pp {layout.pp} x dp {layout.dp}"
                     + (f" x cp {layout.cp}" if layout.cp > 1 else ""))
            check += {"skip": "; finished earlier, skipped", "move aside": "; an earlier run moved to previous-<n>/"
                      }.get(point.note, "")
        print(f"  {point.index:>3}  {cfg.name if cfg is not None else '-'}  {point.shown}  [{check}]")
    return 2 if any(p.error for p in points) else 0


def _check_sweep(overrides: list[str]) -> tuple[Optional[RankInfo], Path]:
    """Every point checked, and its directory, before Hydra touches anything; (this process's ranks, the sweep
    directory to hand to Hydra)."""
    from harness.config.compose import compose
    from harness.run.claim import check_sweep_dir, check_writable
    from harness.run.preflight import joined_ranks
    from harness.run.rundir import check_space
    from harness.run.sweep import check_points, first_error

    fixed = [o for o in overrides if "," not in o.partition("=")[2] or o.startswith("hydra.")]
    info = joined_ranks(compose([o for o in fixed if not o.startswith("hydra.")]))
    writer = info is None or info.rank == 0
    sweep_dir, points = check_points(overrides, writer=writer)
    error = first_error(points)
    if error:
        raise ConfigError(error)
    assert sweep_dir is not None
    if writer:
        check_sweep_dir(sweep_dir)
        check_writable(sweep_dir, "hydra.sweep.dir")
        check_space(sweep_dir)
    _prechecked.update({p.index: p.checked for p in points})
    return info, sweep_dir


def _preflight_single(overrides: list[str]) -> Optional[RankInfo]:
    """Compose and check a single run before Hydra makes its directory; refuse a directory that holds a run, or
    is not the harness's; (this process's ranks)."""
    from harness.config.compose import compose
    from harness.run.claim import check_unclaimed, check_writable
    from harness.run.preflight import joined_ranks, preflight
    from harness.run.rundir import check_space

    cfg = compose([a for a in overrides if not a.startswith("hydra.")])
    info = joined_ranks(cfg)
    world = info.world_size if info else cfg.launcher.nproc
    _prechecked["run"] = preflight(cfg, world, info.local_world_size if info else cfg.launcher.nproc)
    explicit = [a.split("=", 1)[1] for a in overrides if a.startswith("hydra.run.dir=")]
    if info is None or info.rank == 0:
        run_dir = Path(explicit[-1].strip("'\"")) if explicit else Path("results")  # the default lies below results/
        check_writable(run_dir)
        check_space(run_dir)
        if explicit:
            check_unclaimed(run_dir, cfg.launcher.allow_nonempty_dir)
    return info


def _end(info: Optional[RankInfo], message: Optional[str], code: int) -> None:
    """Leave with `code`. A rank started by srun, mpiexec, jsrun or torchrun ends the way the local
    launcher's children end: flush, then os._exit, skipping interpreter finalization.

    Everything the rank owes (steps.jsonl, summary.json, the table) is written by now. Finalization
    tears modules down while C++ threads (gloo's workers, NCCL's watchdog) can still touch Python
    objects, and a rank then aborts after a good run ("terminate called without an active exception",
    seen under srun in CI): the scheduler reports a failed job. multiprocessing ends its children with
    os._exit for the same reason.
    """
    import logging

    if message:
        print(message, file=sys.stderr)
    if info is None:
        raise SystemExit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _non_writer_overrides(info: Optional[RankInfo]) -> list[str]:
    """Ranks other than 0 of a cluster launch compose the same config but must not create run directories."""
    if info is None or info.rank == 0:
        return []
    scratch = tempfile.mkdtemp(prefix="harness-rank-")
    return [f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}", "hydra.output_subdir=null",
            "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def _sweep_result() -> int:
    failed = [(path, status) for path, status in _sweep_points if status not in ("ok", "skipped")]
    if failed:
        print(f"harness: error: {len(failed)} of {len(_sweep_points)} sweep points did not finish ok: "
              + "; ".join(f"{path} ({status})" for path, status in failed), file=sys.stderr)
        return 1
    return 0


def _task(cfg: Any) -> Optional[str]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from harness.run.preflight import joined_ranks

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    key = hydra_cfg.job.num if sweeping else "run"
    try:
        joined = joined_ranks(cfg)
        if joined is not None and joined.rank != 0:
            status = _run_unwritten(cfg, run_dir, sweeping, key)
        else:
            status = _run_written(cfg, run_dir, sweeping, key, joined is None)
    except ConfigError as exc:
        if not sweeping:
            _fail(str(exc))
        # A refused point writes nothing into the directory it refused; the sweep goes on and names it at the end.
        print(f"harness: error: {run_dir}: {exc}", file=sys.stderr)
        _sweep_points.append((str(run_dir), "refused"))
        return "refused"
    except RunError as exc:
        if not sweeping:
            _fail(str(exc), code=1)
        print(f"harness: error: {exc}", file=sys.stderr)
        _sweep_points.append((str(run_dir), "failed"))
        return "failed"
    except Interrupted as exc:
        exc.run_dir, exc.sweeping = str(run_dir), sweeping
        _sweep_points.append((str(run_dir), "interrupted"))
        raise
    if sweeping:
        _sweep_points.append((str(run_dir), status))
    elif status != "ok":
        _fail(f"run {status}{_summary_error(run_dir)}; see {run_dir / 'summary.json'}", code=1)
    return status


def _summary_error(run_dir: Path) -> str:
    """': <the summary's error>' for the one line a failed run ends with (the first line of it)."""
    import json

    try:
        error = json.loads((run_dir / "summary.json").read_text()).get("error")
    except (OSError, ValueError, AttributeError):
        return ""
    return f": {error.splitlines()[0][:300]}" if isinstance(error, str) and error.strip() else ""


def _checked(cfg: Any, key: Any, joined: Any) -> Any:
    """What the command's checks derived for this point (checked again only when they have nothing for it)."""
    from harness.run.preflight import preflight

    checked = _prechecked.pop(key, None)
    if checked is not None:
        return checked
    world = joined.world_size if joined else cfg.launcher.nproc
    return preflight(cfg, world, joined.local_world_size if joined else cfg.launcher.nproc)


def _run_unwritten(cfg: Any, run_dir: Path, sweeping: bool, key: Any) -> str:
    """A rank other than 0 of a cluster launch: it writes nothing; it skips what rank 0 skips."""
    from harness.config.compose import to_container
    from harness.run.launch import run
    from harness.run.preflight import joined_ranks
    from harness.run.sweep import finished_earlier

    if sweeping and cfg.sweep.resume and finished_earlier(run_dir, to_container(cfg)):
        return "skipped"
    return run(cfg, run_dir, _checked(cfg, key, joined_ranks(cfg)))


def _run_written(cfg: Any, run_dir: Path, sweeping: bool, key: Any, spawning: bool) -> str:
    """The writing rank (or the launching process): the directory is locked before anything in it changes;
    a finished point is skipped, an earlier attempt moved aside whole, then Hydra's record and the run."""
    from harness.config.compose import to_container
    from harness.run.claim import RunDirLock, holds_run, move_aside
    from harness.run.launch import run, run_srun_step
    from harness.run.preflight import joined_ranks
    from harness.run.rundir import os_error
    from harness.run.sweep import finished_earlier

    joined = joined_ranks(cfg)
    checked = _checked(cfg, key, joined)
    with RunDirLock(run_dir, allow_nonempty=cfg.launcher.allow_nonempty_dir, sweep_point=sweeping) as lock:
        if sweeping and holds_run(run_dir):
            if cfg.sweep.resume and finished_earlier(run_dir, to_container(cfg)):
                print(f"harness: {run_dir}: finished earlier with the same config, skipped (sweep.resume=true)",
                      file=sys.stderr)
                return "skipped"
            if not cfg.sweep.resume:
                raise ConfigError("holds a run and sweep.resume=false; give a new hydra.sweep.dir")
            aside = move_aside(run_dir)
            print(f"harness: {run_dir}: an earlier unfinished or different run moved to {aside.name}/",  # type: ignore
                  file=sys.stderr)
        try:
            lock.mark()
            _write_hydra_record(run_dir, cfg)
        except OSError as exc:
            raise RunError(f"writing {run_dir} failed ({os_error(exc)}); free some space or give another "
                           "directory") from None
        if cfg.launcher.spawn == "srun" and spawning:
            lock.release()  # the step's rank 0 takes the directory next
            return run_srun_step(cfg, run_dir, _task_overrides())
        return run(cfg, run_dir, checked)


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.")]


def _write_hydra_record(run_dir: Path, cfg: Any) -> None:
    """What Hydra writes into `.hydra/` (config, hydra and overrides YAML), written once the run holds its
    directory, and never over a record already there (an srun step's rank 0 keeps the sweep driver's)."""
    import copy

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, read_write

    from harness.run.rundir import write_atomic

    if _output_subdir is None or (run_dir / _output_subdir / "config.yaml").exists():
        return
    hydra_cfg = copy.deepcopy(HydraConfig.instance().cfg)
    with read_write(hydra_cfg.hydra):  # type: ignore[union-attr]
        hydra_cfg.hydra.output_subdir = _output_subdir  # type: ignore[union-attr]
        told = hydra_cfg.hydra.overrides.hydra  # type: ignore[union-attr]
        hydra_cfg.hydra.overrides.hydra = [o for o in told if o != "hydra.output_subdir=null"]  # type: ignore
    out = run_dir / _output_subdir
    out.mkdir(parents=True, exist_ok=True)
    record = {"config.yaml": cfg, "hydra.yaml": hydra_cfg, "overrides.yaml": HydraConfig.get().overrides.task}
    for name, node in record.items():
        write_atomic(out / name, OmegaConf.to_yaml(node))  # as Hydra's own _save_config, but whole or not at all


def _hydra_app() -> None:
    import hydra

    from harness.config.compose import CONF_DIR

    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)()
