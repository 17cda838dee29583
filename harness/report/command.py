"""`harness report PATH ...`: tables (and with --out, report.md, runs.csv and plots) from run directories."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.core.errors import ConfigError, RunError
from harness.core.registry import REPORT_VIEWS

USAGE = f"""usage: harness report PATH [PATH ...] [--view V[,V]] [--vs KEY] [--by KEY[,KEY]] [--baseline KEY=VALUE]
                      [--format table|md|csv|json] [--out DIR] [--tokens N] [--devices N]

Read every run directory at or below each PATH (a run, a sweep directory, results/runs/, or a glob) into
one table, one row per run, and show the studies' views of it. Failed and OOM runs are rows with their status.

  --view      {' | '.join(REPORT_VIEWS)} (default: the runs' experiment's report.views,
              else chosen from what varies: device count → scaling, backend/layout → compare, else sweep;
              plus prediction and power where the runs have them)
  --vs KEY    the swept key on the x axis (a config key as typed in overrides, e.g. train.micro_batch_size)
  --by KEYS   keys that split runs into separate rows or curves (e.g. backend.name)
  --baseline  compare: the run the others are divided by (e.g. backend.name=fsdp)
  --format    table (default), md, csv or json, printed to stdout
  --out DIR   also write DIR/report.md (tables and plots), DIR/runs.csv (every field) and DIR/<view>.png
  --tokens N  projection: tokens to train on (default 20 per parameter)
  --devices N projection: devices to train on (default each run's own)

  harness report results/runs/2026-12-01/10-00-00-sweep-fsdp-study-cpu-b1-ac-none --out report/
  harness report 'multirun/**' --view compare --baseline backend.name=fsdp --format md"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"report: {message} (harness report --help)")


def _parser() -> _Parser:
    parser = _Parser(prog="harness report", add_help=False)
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--view", default="")
    parser.add_argument("--vs")
    parser.add_argument("--by", default="")
    parser.add_argument("--baseline")
    parser.add_argument("--format", choices=("table", "md", "csv", "json"), default="table")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tokens", type=float)
    parser.add_argument("--devices", type=int)
    return parser


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def report_command(args: list[str]) -> int:
    if not args or any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    ns = _parser().parse_args(args)
    if ns.baseline is not None and "=" not in ns.baseline:
        raise ConfigError(f"report: --baseline={ns.baseline}: give KEY=VALUE, e.g. --baseline backend.name=fsdp")
    for option in ("tokens", "devices"):
        if getattr(ns, option) is not None and getattr(ns, option) <= 0:
            raise ConfigError(f"report: --{option}={getattr(ns, option)}: must be positive")

    from harness.report.load import load_runs
    from harness.report.output import check_out_dir, render, write_report
    from harness.report.views import Options, build_views, column, resolve

    if ns.out is not None:
        check_out_dir(ns.out)
    frame = load_runs(ns.paths)
    options = resolve(frame, Options(views=_split(ns.view), vs=ns.vs, by=_split(ns.by), baseline=ns.baseline,
                                     tokens=ns.tokens, devices=ns.devices))
    views = build_views(frame, options)
    studies = sorted(set(column(frame, "report.study").dropna()))
    header = [f"Reproduces: {s}" for s in studies]
    print(render(views, ns.format, header))
    if ns.out is not None:
        from harness.report.plots import plot
        from harness.run.rundir import os_error

        _mkdir(ns.out)
        try:
            plots = {view.name: plot(view, ns.out, frame) for view in views}
            path = write_report(ns.out, frame, views, header, plots)
        except OSError as exc:
            raise RunError(f"report: writing {getattr(exc, 'filename', None) or ns.out} failed ({os_error(exc)}); "
                           "free some space or give another --out") from None
        print(f"harness: wrote {path}, {ns.out / 'runs.csv'} and {sum(p is not None for p in plots.values())} "
              "plot(s)", file=sys.stderr)
    return 0


def _mkdir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"report: cannot create --out={out}: {exc.strerror}; choose a writable directory") from exc
