"""`harness submit <system>`: render a site's batch job script from its system profile's `job:` block and
print it (`--dry-run`) or hand it to the scheduler (sbatch, qsub, bsub)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core.errors import ConfigError

if TYPE_CHECKING:
    from harness.launchers.jobscript import JobRequest

SUBMIT_USAGE = """usage: harness submit <system> [--dry-run] [key=value ...] [-- harness run overrides ...]

  keys: account, nodes, walltime (HH:MM:SS), queue, tasks (total ranks), results (run directory parent), name
  harness submit frontier --dry-run account=abc123 nodes=2 -- model=gpt-1.3b backend=fsdp"""


def submit_command(args: list[str]) -> int:
    """Render system/<system>.yaml's job script and print it (--dry-run) or hand it to the scheduler."""
    from harness.launchers.jobscript import SubmitError, printable

    if not args or args[0] in ("-h", "--help"):
        print(SUBMIT_USAGE)
        return 0
    try:
        request, dry_run = _job_request(args)
        _check_overrides(request.overrides, request.site, request.total_tasks, request.scheduler)
        return _render_and_submit(request, dry_run)
    except (SubmitError, ConfigError) as exc:
        # Whatever a message quotes of the user's input, it is printed as one line (`harness: error: ...`).
        raise ConfigError(printable(str(exc))) from exc


def _job_request(args: list[str]) -> tuple[JobRequest, bool]:
    """Parse `<system> [--dry-run] key=value ... -- overrides` against the system's `job:` block."""
    from omegaconf import OmegaConf

    from harness.config.compose import group_choices, load_yaml, search_dirs
    from harness.config.schema import JobConfig
    from harness.launchers.jobscript import PARAMS, JobRequest, SubmitError, check, find_template, parse_count

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
        values[key] = parse_count(key, value) if key in ("nodes", "tasks") else value
    # The package's profile, else the user's (`harness calibrate` writes those): Hydra's search order.
    profiles = (root / "system" / f"{site}.yaml" for root in search_dirs())
    system = load_yaml(next(path for path in profiles if path.is_file()))
    job = OmegaConf.merge(OmegaConf.structured(JobConfig), system.get("job", {}))
    defaults = {"walltime": job.walltime, "queue": job.queue}
    request = JobRequest(
        site=site, scheduler=job.scheduler, script=find_template(job.script),
        ranks_per_node=job.ranks_per_node or system.get("devices_per_node", 1), env=dict(job.env),
        overrides=overrides, **{**defaults, **values})
    check(request, job.account_required)
    return request, dry_run


def _check_overrides(overrides: list[str], site: str, world_size: int, scheduler: str) -> None:
    """Compose and validate the run's config for the job's rank count now, not after hours in the queue: every
    point of a sweep (`-- -m ...`, run point after point inside the one allocation: Slurm sites)."""
    from harness.config.checks import validate
    from harness.config.compose import compose, sweep_points

    options = [o for o in overrides if o.startswith("-")]
    sweep = [o for o in options if o in ("-m", "--multirun")]
    if len(options) > len(sweep):
        bad = next(o for o in options if o not in sweep)
        raise ConfigError(f"submit: {bad}: give only overrides after -- (and -m for a sweep run point after point "
                          "inside the job)")
    if sweep and scheduler != "slurm":
        raise ConfigError(f"submit: -m: a sweep inside one job runs its points as srun steps, and {site} uses "
                          f"{scheduler}; submit one job per point, or sweep with `harness run -m` inside an allocation")
    rest = [o for o in overrides if not o.startswith("-")]
    points = sweep_points([f"system={site}", *rest]) if sweep else [[f"system={site}", *rest]]
    for i, point in enumerate(points):
        try:
            validate(compose([o for o in point if not o.startswith("hydra.")]), world_size)
        except ConfigError as exc:
            varying = " ".join(o for o in point if o not in rest and not o.startswith("system="))
            where = f"sweep point {i} ({varying}): " if sweep else ""
            raise ConfigError(f"{where}{exc}") from exc


def _render_and_submit(request: JobRequest, dry_run: bool) -> int:
    import datetime
    import subprocess

    from harness.launchers.jobscript import SUBMIT, SubmitError, printable, render, submit_command

    script = render(request)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path("results/jobs/scripts") / f"{request.site}-{stamp}{request.script.suffix}"
    if dry_run:
        print(script, end="")
        print(f"harness: dry run: would write {path} and run: {submit_command(request.scheduler, path)}",
              file=sys.stderr)
        return 0
    if shutil.which(SUBMIT[request.scheduler]) is None:
        raise SubmitError(f"{SUBMIT[request.scheduler]} not found: run `harness submit {request.site}` on the "
                          "site's login node, or add --dry-run to print the script")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    # No shell between us and the scheduler: sbatch and qsub take the file, bsub reads it on its standard input.
    lsf = request.scheduler == "lsf"
    with path.open() as text:
        done = subprocess.run([SUBMIT[request.scheduler], *([] if lsf else [str(path)])],
                              stdin=text if lsf else subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        said = "; ".join(line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip())
        print(f"harness: error: {SUBMIT[request.scheduler]} refused {path}: {printable(said)}", file=sys.stderr)
        return 1
    print(f"{path}: {done.stdout.strip()}")
    return 0
