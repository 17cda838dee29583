"""The `harness` command. Subcommands take Hydra overrides; `run` is a real `hydra.main` application,
so `-m` sweeps, `hydra.run.dir=...`, `hydra.sweep.dir=...` and `--cfg job` behave as Hydra users expect.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

USAGE = """usage: harness run [overrides ...] [-m] [hydra options]

  harness run                                   tiny GPT, 1 rank, ddp, CPU
  harness run launcher.nproc=2 backend=fsdp     2 local ranks, FSDP2
  harness run -m train.micro_batch_size=1,2,4   a sweep, one run directory per point
  harness run --cfg job                         print the composed config
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
    sys.argv = ["harness run", *args, *_non_writer_overrides()]
    _hydra_app()


def _non_writer_overrides() -> list[str]:
    """Ranks other than 0 of a cluster launch compose the same config but must not create run directories."""
    from launchers.env import discover

    info = discover(os.environ)
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
    "estimate": _checked("harness.predict:estimate_command"),
    "plan": _checked("harness.planner:plan_command"),
    "calibrate": _checked("harness.calibrate:calibrate_command"),
}

if __name__ == "__main__":
    main()
