"""The `harness` command. Subcommands take Hydra overrides; `run` is a real `hydra.main` application,
so `-m` sweeps, `hydra.run.dir=...`, `hydra.sweep.dir=...` and `--cfg job` behave as Hydra users expect.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from harness.config import ConfigError

if TYPE_CHECKING:
    from launchers.env import RankInfo
    from launchers.jobscript import JobRequest

USAGE = """usage: harness run [overrides ...] [-m] [hydra options]

  harness run                                   tiny GPT, 1 rank, ddp, CPU
  harness run launcher.nproc=2 backend=fsdp     2 local ranks, FSDP2
  harness run -m train.micro_batch_size=1,2,4   a sweep, one run directory per point
  harness run --cfg job                         print the composed config
  harness submit frontier --dry-run account=abc123 nodes=2 -- backend=fsdp
                                                a site's batch job script (harness submit -h)
  harness estimate model=gpt-1t system=frontier parallel.tp=8 parallel.pp=64 parallel.world_size=3072 [--json]
  harness plan model=gpt-13b system=dgx-a100-80gb parallel.world_size=64 train.global_batch_size=512 [--json]
  harness calibrate launcher.nproc=2            measure this host; writes conf/system/<name>.yaml

Config groups: model, backend, data, system (see conf/). Results: results/runs/<date>/<time>-<name>/."""


def _fail(message: str, code: int = 2) -> None:
    print(f"harness: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        _fail(f"unknown command '{command}'; choose one of: {', '.join(COMMANDS)}\n{USAGE}")
    COMMANDS[command](rest)


def _run(args: list[str]) -> None:
    from harness.config import ConfigError, check_group_overrides, register_schema

    try:
        check_group_overrides([a for a in args if not a.startswith(("-", "hydra"))])
    except ConfigError as exc:
        _fail(str(exc))
    register_schema()
    from launchers.env import discover

    info = discover(os.environ)
    sys.argv = ["harness run", *args, *_non_writer_overrides(info)]
    if info is None:
        _hydra_app()
        return
    try:
        _hydra_app()
    except SystemExit as exc:
        _end_rank_process(exc.code)
    _end_rank_process(0)


def _end_rank_process(code: object) -> None:
    """End a rank started by srun, mpiexec, jsrun or torchrun the way the local launcher's children end:
    flush, then os._exit, skipping interpreter finalization.

    Everything the rank owes (steps.jsonl, summary.json, the table) is written by now. Finalization
    tears modules down while C++ threads (gloo's workers, NCCL's watchdog) can still touch Python
    objects, and a rank then aborts after a good run ("terminate called without an active exception",
    seen under srun in CI): the scheduler reports a failed job. multiprocessing ends its children with
    os._exit for the same reason.
    """
    import logging

    if isinstance(code, str):  # SystemExit("message") prints the message and exits 1
        print(code, file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


def _non_writer_overrides(info: Optional[RankInfo]) -> list[str]:
    """Ranks other than 0 of a cluster launch compose the same config but must not create run directories."""
    if info is None or info.rank == 0:
        return []
    scratch = tempfile.mkdtemp(prefix="harness-rank-")
    return [f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}", "hydra.output_subdir=null",
            "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def _task(cfg) -> None:  # type: ignore[no-untyped-def]
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from harness.config import ConfigError, to_container
    from harness.results import build_summary, environment, hostname, write_config, write_summary

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        from harness.runner import run

        status = run(cfg, run_dir)
    except ConfigError as exc:
        if not sweeping:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing ran: leave no empty run directory
            _fail(str(exc))
        print(f"harness: error: {exc}", file=sys.stderr)  # a sweep goes on with its next point
        write_config(run_dir, to_container(cfg))
        write_summary(run_dir, build_summary(
            status="failed", error=f"ConfigError: {exc}", config=to_container(cfg), layout={}, model={}, steps=[],
            env=environment(world_size=0, hostnames=[hostname()], devices=[], launcher="none"),
        ))
        return
    if status != "ok" and not sweeping:
        _fail(f"run {status}; see {run_dir / 'summary.json'}", code=1)


def _hydra_app() -> None:
    import hydra

    from harness.config import CONF_DIR

    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)()


SUBMIT_USAGE = """usage: harness submit <system> [--dry-run] [key=value ...] [-- harness run overrides ...]

  keys: account, nodes, walltime (HH:MM:SS), queue, tasks (total ranks), results (run directory parent), name
  harness submit frontier --dry-run account=abc123 nodes=2 -- model=gpt-1.3b backend=fsdp"""


def _submit(args: list[str]) -> None:
    """Render conf/system/<system>.yaml's job script and print it (--dry-run) or hand it to the scheduler."""
    from launchers.jobscript import SubmitError

    if not args or args[0] in ("-h", "--help"):
        print(SUBMIT_USAGE)
        return
    try:
        request, dry_run = _job_request(args)
        _check_overrides(request.overrides, request.site, request.total_tasks)
        _render_and_submit(request, dry_run)
    except (SubmitError, ConfigError) as exc:
        _fail(str(exc))


def _job_request(args: list[str]) -> tuple[JobRequest, bool]:
    """Parse `<system> [--dry-run] key=value ... -- overrides` against the system's `job:` block."""
    from omegaconf import OmegaConf

    from harness.config import CONF_DIR, JobConfig, group_choices
    from launchers.jobscript import PARAMS, JobRequest, SubmitError, check

    site, rest = args[0], args[1:]
    if site not in group_choices("system"):
        raise SubmitError(f"unknown system '{site}'; choose one of: {', '.join(group_choices('system'))}")
    split = rest.index("--") if "--" in rest else len(rest)
    params, overrides = rest[:split], rest[split + 1:]
    dry_run = "--dry-run" in params
    values: dict[str, Any] = {}
    for param in (p for p in params if p != "--dry-run"):
        key, sep, value = param.partition("=")
        if not sep or key not in PARAMS:
            raise SubmitError(f"{param}: expected key=value with key one of {', '.join(PARAMS)} "
                              "(harness overrides go after --)")
        if key in ("nodes", "tasks"):
            if not value.isdigit():
                raise SubmitError(f"{key}={value}: must be a whole number")
            values[key] = int(value)
        else:
            values[key] = value
    system = OmegaConf.load(CONF_DIR / "system" / f"{site}.yaml")
    job = OmegaConf.merge(OmegaConf.structured(JobConfig), system.get("job", {}))
    defaults = {"walltime": job.walltime, "queue": job.queue}
    request = JobRequest(
        site=site, scheduler=job.scheduler, script=CONF_DIR.parent / job.script,
        ranks_per_node=job.ranks_per_node or system.get("devices_per_node", 1), env=dict(job.env),
        overrides=overrides, **{**defaults, **values})
    check(request, job.account_required)
    return request, dry_run


def _check_overrides(overrides: list[str], site: str, world_size: int) -> None:
    """Compose and validate the run's config for the job's rank count now, not after hours in the queue."""
    from hydra.errors import HydraException

    from harness.config import validate
    from harness.predict import compose

    try:
        cfg = compose([f"system={site}", *overrides])
    except HydraException as exc:
        lines = str(exc).strip().splitlines()
        raise ConfigError(" ".join(lines[:2])) from exc
    validate(cfg, world_size)


def _render_and_submit(request: JobRequest, dry_run: bool) -> None:
    import datetime
    import subprocess

    from launchers.jobscript import SUBMIT, SubmitError, render, submit_command

    script = render(request)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path("results/jobs/scripts") / f"{request.site}-{stamp}{request.script.suffix}"
    if dry_run:
        print(script, end="")
        print(f"harness: dry run: would write {path} and run: {submit_command(request.scheduler, path)}",
              file=sys.stderr)
        return
    if shutil.which(SUBMIT[request.scheduler]) is None:
        raise SubmitError(f"{SUBMIT[request.scheduler]} not found: run `harness submit {request.site}` on the "
                          "site's login node, or add --dry-run to print the script")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    done = subprocess.run(submit_command(request.scheduler, path), shell=True, capture_output=True, text=True)
    if done.returncode != 0:
        _fail(f"{SUBMIT[request.scheduler]} refused {path}: {done.stderr.strip() or done.stdout.strip()}", code=1)
    print(f"{path}: {done.stdout.strip()}")


def _checked(command_path: str):  # type: ignore[no-untyped-def]
    """A subcommand imported on use, with config errors printed as one line and its exit status kept."""
    def command(args: list[str]) -> None:
        import importlib

        from harness.config import ConfigError

        module, _, name = command_path.partition(":")
        try:
            code = getattr(importlib.import_module(module), name)(args)
        except ConfigError as exc:
            _fail(str(exc))
        if code:
            raise SystemExit(code)
    return command


# Each subcommand takes the arguments after its name. Add new subcommands here.
COMMANDS = {
    "run": _run,
    "submit": _submit,
    "estimate": _checked("harness.predict:estimate_command"),
    "plan": _checked("harness.planner:plan_command"),
    "calibrate": _checked("harness.calibrate:calibrate_command"),
}

if __name__ == "__main__":
    main()
