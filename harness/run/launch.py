"""Start or join the ranks of one benchmark run, and make sure its run directory ends with a summary.

`run` executes in the process the user started, after `preflight` has checked the config. It either
joins the ranks a cluster launcher started (torchrun, srun, mpiexec), runs a single rank in-process,
or starts `launcher.nproc` local ranks through PyTorch's elastic agent. `rank_main` is what every
rank runs. If no rank managed to write `summary.json` (a rank was killed, say), `run` writes it from
the steps already on disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

from harness.config.compose import to_container
from harness.core.console import guard_stdout, run_logging, say
from harness.core.errors import ConfigError
from harness.core.layout import Layout
from harness.costmodel.estimate import predicted_metrics
from harness.launchers.env import RankInfo, export
from harness.launchers.local import launch_local
from harness.run.preflight import Checked, joined_ranks, preflight
from harness.run.rank import rank_process, threads_per_rank
from harness.run.rundir import disk_warning, failed_summary, write_config, write_summary
from harness.run.stopping import Interrupted, Terminated, stop_on_signals
from harness.run.trainer import Trainer
from harness.telemetry.process import host_load_now

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path, checked: Optional[Checked] = None) -> str:
    """Run one benchmark and return its status (`ok | failed | oom | diverged`); raises Interrupted (the summary
    written) when Ctrl-C or SIGTERM stopped it. The caller holds the run directory (claim.RunDirLock) and gives
    what its checks derived (None: checked here; ConfigError before launch): the ranks get the layout and the
    prediction as they are, not derived again."""
    joined = joined_ranks(cfg)
    local = joined.local_world_size if joined else cfg.launcher.nproc
    checked = checked or preflight(cfg, joined.world_size if joined else cfg.launcher.nproc, local)
    layout = checked.layout
    config = to_container(cfg)
    # The host before any rank starts; a launcher's ranks start together, so they have no "before".
    before = host_load_now() if joined is None else None
    handed = (config, str(run_dir), layout.as_dict(), predicted_metrics(checked.estimate), before)
    if joined is None or joined.rank == 0:
        warning = disk_warning(run_dir)
        if warning:
            print(f"harness: warning: {warning}", file=sys.stderr)
        write_config(run_dir, config)
    os.environ["OMP_NUM_THREADS"] = str(threads_per_rank(cfg.launcher.omp_num_threads, local))
    try:
        if joined is not None:
            rank_main(*handed)
        elif cfg.launcher.nproc == 1:
            with _single_rank_env():
                rank_main(*handed)  # raises SystemExit when a signal stopped it
        else:
            say(f"starting {cfg.launcher.nproc} local ranks (torch.distributed.elastic) into {run_dir}")
            launch_local(cfg.launcher.nproc, rank_main, *handed, monitor_interval_s=cfg.launcher.monitor_interval_s,
                         max_restarts=cfg.launcher.max_restarts)
    except ChildFailedError as exc:
        return _ensure_failed_summary(run_dir, config, layout, _child_error(exc))
    except SignalException as exc:  # the local agent stopped by Ctrl-C or SIGTERM; it ended the ranks
        _stopped(run_dir, config, layout, exc.sigval)
    except Exception as exc:  # the in-process rank already wrote its summary
        return _ensure_failed_summary(run_dir, config, layout, f"{type(exc).__name__}: {exc}")
    except SystemExit as exc:  # the in-process rank stopped by a signal, its summary written
        _stopped(run_dir, config, layout, int(exc.code or 0) - 128 if isinstance(exc.code, int) else signal.SIGTERM)
    finally:
        stop_on_signals()  # torch's agent put in its own handlers
    summary = run_dir / "summary.json"
    return _read_status(summary) if summary.exists() else "ok"


def _stopped(run_dir: Path, config: dict[str, Any], layout: Layout, signum: int) -> None:
    name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else f"signal {signum}"
    _ensure_failed_summary(run_dir, config, layout, f"Interrupted: stopped by {name}", interrupted=True)
    raise Interrupted(signum if signum in signal.Signals._value2member_map_ else signal.SIGTERM)


def run_srun_step(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> str:
    """launcher.spawn=srun: run this point's ranks as one srun step over the Slurm job's tasks and return its
    status. The batch shell drives a sweep point after point (`harness submit <site> ... -- -m ...`); the job
    script's own srun line (HARNESS_SPAWN_COMMAND) starts the ranks, which write the run directory as any srun
    launch does. A point is not started when the allocation ends within launcher.walltime_margin_s."""
    import shlex
    import subprocess
    import time

    from torch.distributed.elastic.utils.distributed import get_free_port

    if "SLURM_JOB_ID" not in os.environ:
        raise ConfigError("launcher.spawn=srun: not inside a Slurm job (no SLURM_JOB_ID); run the sweep with "
                          "`harness submit <site> ... -- -m ...`, or leave launcher.spawn=local")
    end = os.environ.get("HARNESS_JOB_END_TIME", "")
    if end.isdigit() and int(end) - time.time() < cfg.launcher.walltime_margin_s:
        print(f"harness: {run_dir}: not started, the allocation ends in {int(end) - time.time():.0f} s "
              f"(launcher.walltime_margin_s={cfg.launcher.walltime_margin_s:g})", file=sys.stderr)
        return "not started"
    command = shlex.split(os.environ.get("HARNESS_SPAWN_COMMAND")
                          or f"srun --kill-on-bad-exit=1 {shlex.quote(sys.executable)} -m harness.cli run")
    # A fresh port per point: the previous step's store may still hold the last one.
    env = dict(os.environ, MASTER_PORT=str(get_free_port()))
    done = subprocess.run([*command, f"hydra.run.dir={run_dir}", *overrides], env=env)
    summary = run_dir / "summary.json"
    if summary.exists():
        return _read_status(summary)
    failed_summary(run_dir, config=to_container(cfg), error=f"srun step exited {done.returncode} before any rank "
                   "wrote a summary", stop_reason="failed", launcher="slurm")
    return "failed"


@contextlib.contextmanager
def _single_rank_env() -> Iterator[None]:
    """torchrun-style variables for a 1-rank job run in this process; removed afterwards."""
    from torch.distributed.elastic.utils.distributed import get_free_port

    saved = dict(os.environ)
    export(RankInfo(0, 0, 1, 1, 0, "127.0.0.1", get_free_port(), "local", 1))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _child_error(exc: ChildFailedError) -> str:
    """Every failed rank in the order the agent saw them: the first is usually the cause, the rest its echo."""
    parts = []
    for rank, failure in sorted(exc.failures.items(), key=lambda item: item[1].timestamp):
        message = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        detail = message.strip().splitlines()[-1] if message.strip() else f"exit code {failure.exitcode}"
        parts.append(f"rank {rank} failed: {detail}")
    return "; ".join(parts)


def _read_status(summary: Path) -> str:
    try:
        return json.loads(summary.read_text())["status"]
    except (OSError, ValueError, KeyError):
        return "failed"


def _ensure_failed_summary(run_dir: Path, config: dict[str, Any], layout: Layout, error: str,
                           interrupted: bool = False) -> str:
    """Make `summary.json` say why the job ended, from the launching process's view of all ranks.

    A rank may have written its own summary first (a peer's death shows up there as a collective error, the
    launcher's SIGTERM to the survivors as `interrupted`); its steps are kept, the error names every failed
    rank, and the status is the launching process's: interrupted only when it was itself stopped by a signal."""
    path = run_dir / "summary.json"
    stalled = "StalledRun:" in error  # some rank's watchdog ended the job
    oom = "OutOfMemoryError" in error or "out of memory" in error.lower()
    status = "interrupted" if interrupted else "oom" if oom else "failed"
    stop_reason = "interrupted" if interrupted else "watchdog" if stalled else "failed"
    if path.exists() and _read_status(path) != "ok":
        summary = json.loads(path.read_text())
        if not interrupted:
            summary["error"] = error  # includes what rank 0 reported, through its @record error file
        if summary["status"] in ("failed", "interrupted") or oom or interrupted:
            summary["status"] = status  # a peer's OOM reaches rank 0 only as the agent's SIGTERM
            if interrupted or stalled or summary.get("stop_reason") == "interrupted":
                summary["stop_reason"] = stop_reason
        write_summary(run_dir, summary)
        return summary["status"]
    failed_summary(run_dir, config=config, error=error, status=status, layout=layout.as_dict(),
                   stop_reason=stop_reason, launcher="unknown")
    if not interrupted:
        log.error("run failed: %s", error)
    return status


@record
def rank_main(config: dict[str, Any], run_dir: str, layout: dict[str, int], prediction: dict[str, Any],
              host_before: Optional[dict[str, Any]] = None) -> None:
    """What every rank runs: join the process group, train, leave (with the layout and the prediction the launching
    process's checks derived, and the host's load before the ranks started)."""
    guard_stdout(warn=True)  # a closed or full console must not end a run
    cfg = OmegaConf.create(config)
    run_logging(Path(run_dir) / "harness.log", int(os.environ.get("RANK", 0)))
    launcher = cfg.launcher
    try:
        with rank_process(device=cfg.system.device, gpu_order=launcher.gpu_order,
                          pg_timeout_s=launcher.pg_timeout_s) as ctx:
            Trainer(cfg, ctx.info, ctx.device, Path(run_dir), Layout(**layout), prediction, host_before).run()
    except (Terminated, KeyboardInterrupt) as exc:
        # Stopped by the launcher or the user: the summary is written; end without a traceback.
        raise SystemExit(128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)) from None
