"""The `harness` command: the table of subcommands, each in the module named after it, imported on use.

Every subcommand takes Hydra overrides; a config error anywhere prints one line (`harness: error: ...`)
and exits 2, a runtime failure (a full disk, an unreadable input) one line and exit 1.
"""

from __future__ import annotations

import importlib
import sys

from harness.core.console import guard_stdout, quiet_console, stdout_error
from harness.core.errors import ConfigError, RunError

COMMANDS = {  # name: (module:function, one-line summary)
    "run": ("harness.run.command:run_command", "train a GPT for a bounded number of steps and measure it"),
    "estimate": ("harness.predict.estimate:estimate_command", "predict memory, time and energy of one layout"),
    "plan": ("harness.predict.plan:plan_command", "rank the layouts that fit by predicted throughput"),
    "search": ("harness.predict.search:search_command",
               "run the layouts the cost model ranks best, then search on (Optuna), measured"),
    "calibrate": ("harness.predict.calibrate:calibrate_command",
                  "measure this host and write a system profile (system=<name>)"),
    "submit": ("harness.submit:submit_command", "render a site's batch job script and submit it"),
    "report": ("harness.report.command:report_command",
               "tables, plots and report.md from run and sweep directories"),
    "data": ("harness.data:data_command", "tokenize local text into a Megatron .bin/.idx dataset (data prepare)"),
}

USAGE = "usage: harness <command> [overrides ...] [--help]\n\ncommands:\n" + "\n".join(
    f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()) + """

  harness run launcher.nproc=2 backend=fsdp
  harness estimate model=gpt-1t system=frontier backend=deepspeed3d parallel.tp=8 parallel.pp=64 \\
      parallel.world_size=3072
  harness report results/runs --out report/
  harness plan model=gpt-13b system=dgx-a100-80gb parallel.world_size=64 train.global_batch_size=512

`harness <command> --help` shows a command's own usage; -v (anywhere) lets third-party log lines and
warnings through to the terminal (they are always in the run's harness.log)."""


def _fail(message: str, code: int = 2) -> None:
    print(f"harness: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        guard_stdout()
        print(USAGE)
        return
    chatty = any(a in ("-v", "--verbose") for a in args)
    args = [a for a in args if a not in ("-v", "--verbose")]
    quiet_console(chatty)  # before torch loads: its native loggers read their levels once
    if not args:
        guard_stdout()
        print(USAGE)
        return
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        _fail(f"unknown command '{command}'; choose one of: {', '.join(COMMANDS)} (harness --help)")
    module, _, name = COMMANDS[command][0].partition(":")
    guard_stdout()
    try:
        if command in ("run", "search"):  # a CPU host measured once, so predictions exist (predict/auto.py)
            from harness.predict.auto import auto_system

            rest = auto_system(rest)
        code = getattr(importlib.import_module(module), name)(rest)
    except ConfigError as exc:
        _fail(str(exc))
    except RunError as exc:
        _fail(str(exc), code=1)
    lost = stdout_error()
    if lost and not code:
        _fail(lost, code=1)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
