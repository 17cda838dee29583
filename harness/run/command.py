"""`harness run`: a real `hydra.main` application, so `-m` sweeps, `hydra.run.dir=...`,
`hydra.sweep.dir=...` and `--cfg job` behave as Hydra users expect.

A single run is composed and checked (`preflight`) before Hydra creates its directory, so a config
error leaves nothing behind and touches nothing that was there. A sweep runs every point and exits
non-zero, naming them, when any point failed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from harness.config.errors import ConfigError

if TYPE_CHECKING:
    from launchers.env import RankInfo

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


def _fail(message: str, code: int = 2) -> None:
    print(f"harness: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_command(args: list[str]) -> int:
    from harness.config.compose import check_group_overrides, searchpath_overrides
    from harness.config.schema import register_schema
    from launchers.env import discover

    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    multirun = any(a in ("-m", "--multirun") for a in args)
    if "--dry-run" in args or (multirun and any(a.startswith(("--cfg", "-c")) for a in args)):
        try:
            return _list_points(args)
        except ConfigError as exc:
            _fail(str(exc))
    info_only = any(a.startswith(("--cfg", "-c", "--info", "--hydra-help", "--resolve", "--package")) for a in args)
    try:
        check_group_overrides([a for a in args if not a.startswith(("-", "hydra"))])
        info = discover(os.environ)
        if not multirun and not info_only:
            _preflight_single(args, info)
    except ConfigError as exc:
        _end(info if "info" in locals() else None, f"harness: error: {exc}", 2)
    register_schema()
    options, overrides = _split_hydra_args(args)
    private = _non_writer_overrides(info)  # a non-writer rank's directories win over the user's
    if private:
        overrides = [a for a in overrides
                     if not a.startswith(("hydra.run.dir=", "hydra.sweep.dir=", "hydra.output_subdir="))]
    sys.argv = ["harness run", *options, *searchpath_overrides(), *private, *overrides]
    code = 0
    try:
        _hydra_app()
        code = _sweep_result() if multirun else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    if info is None:
        return code
    _end(info, None, code)
    return code


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
    host's device and memory, so a cluster sweep can be checked on a login node); `-m --cfg job`: every
    point's composed config. Nothing is run, no directory is made. Exit 2 when a point is invalid."""
    from omegaconf import OmegaConf

    from harness.config.checks import validate
    from harness.config.compose import compose, sweep_points

    options, overrides = _split_hydra_args(args)
    points = sweep_points(overrides)
    cfg_part = next((options[i + 1] for i, o in enumerate(options[:-1]) if o in ("-c", "--cfg")), None)
    values: dict[str, set[str]] = {}
    for override in (o for p in points for o in p):
        key, _, value = override.partition("=")
        values.setdefault(key, set()).add(value)
    varying = {key for key, seen in values.items() if len(seen) > 1}
    bad = 0
    if cfg_part is None:
        print(f"harness: {len(points)} point(s); nothing run (drop --dry-run to run them)")
    for i, point in enumerate(points):
        shown = [o for o in point if o.split("=", 1)[0] in varying] or [o for o in point if not o.startswith("hydra.")]
        try:
            cfg = compose([o for o in point if not o.startswith("hydra.")], hydra_node=cfg_part in ("hydra", "all"))
            if cfg_part is not None:
                section = cfg.hydra if cfg_part == "hydra" else cfg
                print(f"# point {i} of {len(points)}: {' '.join(shown)}\n{OmegaConf.to_yaml(section)}")
                continue
            world = cfg.parallel.world_size or cfg.launcher.nproc
            layout = validate(cfg, world)
            check = f"ok: {world} rank(s), tp {layout.tp} x pp {layout.pp} x dp {layout.dp}"
        except ConfigError as exc:
            bad += 1
            check, cfg = f"error: {exc}", None
        name = cfg.name if cfg is not None else "-"
        print(f"  {i:>3}  {name}  {' '.join(shown)}  [{check}]")
    return 2 if bad else 0


def _preflight_single(args: list[str], info: Optional[RankInfo]) -> None:
    """Compose and check a single run before Hydra makes its directory; refuse a directory that holds a run."""
    from harness.config.compose import compose
    from harness.run.preflight import preflight
    from harness.run.rundir import check_unclaimed, check_writable

    overrides = [a for a in args if not a.startswith("-")]
    cfg = compose([a for a in overrides if not a.startswith("hydra.")])
    world = info.world_size if info else cfg.launcher.nproc
    preflight(cfg, world, info.local_world_size if info else cfg.launcher.nproc)
    explicit = [a.split("=", 1)[1] for a in overrides if a.startswith("hydra.run.dir=")]
    if info is None or info.rank == 0:
        run_dir = Path(explicit[-1]) if explicit else Path("results")  # the default lies below results/
        check_writable(run_dir)
        check_unclaimed(run_dir)


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

    from harness.config.compose import to_container
    from harness.run.launch import run, run_srun_step
    from harness.run.rundir import failed_summary
    from launchers.env import discover

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    joined = discover(os.environ)
    if sweeping and cfg.sweep.resume and _resume_point(run_dir, to_container(cfg), joined is None or joined.rank == 0):
        return "skipped"
    try:
        if cfg.launcher.spawn == "srun" and joined is None:
            status = run_srun_step(cfg, run_dir, [o for o in hydra_cfg.overrides.task if not o.startswith("hydra.")])
        else:
            status = run(cfg, run_dir)
    except ConfigError as exc:
        if not sweeping:
            _fail(str(exc))
        print(f"harness: error: {run_dir}: {exc}", file=sys.stderr)  # a sweep goes on with its next point
        if not (run_dir / "summary.json").exists():
            failed_summary(run_dir, config=to_container(cfg), error=f"ConfigError: {exc}")
        _sweep_points.append((str(run_dir), "failed"))
        return "failed"
    if sweeping:
        _sweep_points.append((str(run_dir), status))
    elif status != "ok":
        _fail(f"run {status}; see {run_dir / 'summary.json'}", code=1)
    return status


RESUME_IGNORED = ("sweep", "report", "search", "costmodel")
"""Config sections that do not change what a point measures: a point finished under other values still counts."""


def _resume_point(run_dir: Path, config: dict[str, Any], writer: bool = True) -> bool:
    """sweep.resume: True (skip) for a point that already finished ok with the same config; any other earlier
    run in the directory (unfinished, failed, or of another config) is moved aside into previous-<n>/ (never
    deleted) by the writing rank, and the point runs again."""
    if finished_earlier(run_dir, config):
        print(f"harness: {run_dir}: finished earlier with the same config, skipped (sweep.resume=true)",
              file=sys.stderr)
        _sweep_points.append((str(run_dir), "skipped"))
        return True
    if not writer:
        return False
    files = [p for p in run_dir.iterdir() if p.is_file() and p.name != "harness.log"] if run_dir.exists() else []
    if any(p.name in ("steps.jsonl", "summary.json") for p in files):
        n = 1
        while (run_dir / f"previous-{n}").exists():
            n += 1
        aside = run_dir / f"previous-{n}"
        aside.mkdir()
        for path in files:
            path.rename(aside / path.name)
        print(f"harness: {run_dir}: an earlier unfinished or different run moved to {aside.name}/", file=sys.stderr)
    return False


def finished_earlier(run_dir: Path, config: dict[str, Any]) -> bool:
    """A point whose directory holds an ok summary of the same measured config (sweep.resume's rule, also for
    points the cluster launcher does not submit again)."""
    try:
        earlier = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return earlier.get("status") == "ok" and _measured(earlier.get("config") or {}) == _measured(config)


def _measured(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RESUME_IGNORED}


def _hydra_app() -> None:
    import hydra

    from harness.config.compose import CONF_DIR

    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)()
