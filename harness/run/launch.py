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
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

from harness.config.checks import Layout
from harness.config.compose import to_container
from harness.run.preflight import preflight
from harness.run.rank import rank_process, threads_per_rank
from harness.run.rundir import RunDirLock, disk_warning, failed_summary, write_config, write_summary
from harness.run.stopping import Terminated
from harness.run.trainer import Trainer
from launchers.env import RankInfo, discover, export
from launchers.local import launch_local

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path) -> str:
    """Run one benchmark and return its status (`ok | failed | oom`). Raises ConfigError before launch."""
    joined = discover(os.environ)
    world_size = joined.world_size if joined else cfg.launcher.nproc
    layout = preflight(cfg, world_size, joined.local_world_size if joined else cfg.launcher.nproc)
    config = to_container(cfg)
    writer = joined is None or joined.rank == 0
    with RunDirLock(run_dir) if writer else contextlib.nullcontext():
        if writer:
            warning = disk_warning(run_dir)
            if warning:
                print(f"harness: warning: {warning}", file=sys.stderr)
            write_config(run_dir, config)
        os.environ["OMP_NUM_THREADS"] = str(threads_per_rank(
            cfg.launcher.omp_num_threads, joined.local_world_size if joined else cfg.launcher.nproc))
        try:
            if joined is not None:
                rank_main(config, str(run_dir))
            elif cfg.launcher.nproc == 1:
                with _single_rank_env():
                    rank_main(config, str(run_dir))  # raises SystemExit when a signal stopped it
            else:
                launch_local(cfg.launcher.nproc, rank_main, config, str(run_dir),
                             monitor_interval_s=cfg.launcher.monitor_interval_s)
        except ChildFailedError as exc:
            return _ensure_failed_summary(run_dir, config, layout, _child_error(exc))
        except Exception as exc:  # the in-process rank already wrote its summary
            return _ensure_failed_summary(run_dir, config, layout, f"{type(exc).__name__}: {exc}")
        except SystemExit as exc:  # the in-process rank stopped by a signal, its summary written
            return _ensure_failed_summary(run_dir, config, layout, f"Terminated: stopped by a signal (exit {exc.code})")
    summary = run_dir / "summary.json"
    return _read_status(summary) if summary.exists() else "ok"


def run_srun_step(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> str:
    """launcher.spawn=srun: run this point's ranks as one srun step over the Slurm job's tasks and return its
    status. The batch shell drives a sweep point after point (`harness submit <site> ... -- -m ...`); the job
    script's own srun line (HARNESS_SPAWN_COMMAND) starts the ranks, which write the run directory as any srun
    launch does. A point is not started when the allocation ends within launcher.walltime_margin_s."""
    import shlex
    import subprocess
    import time

    from torch.distributed.elastic.utils.distributed import get_free_port

    from harness.config.errors import ConfigError

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


def _ensure_failed_summary(run_dir: Path, config: dict[str, Any], layout: Layout, error: str) -> str:
    """Make `summary.json` say why the job failed, from the launching process's view of all ranks.

    A rank may have written its own failed summary first (a peer's death shows up there as a
    collective error); its status and steps are kept, and the error names every failed rank.
    """
    path = run_dir / "summary.json"
    stalled = "StalledRun:" in error  # some rank's watchdog ended the job
    oom = "OutOfMemoryError" in error or "out of memory" in error.lower()
    if path.exists() and _read_status(path) != "ok":
        summary = json.loads(path.read_text())
        summary["error"] = error  # includes what rank 0 reported, through its @record error file
        summary["stop_reason"] = "watchdog" if stalled else summary.get("stop_reason", "failed")
        if oom:  # a peer's OOM reaches rank 0 only as the agent's SIGTERM or a broken collective
            summary["status"] = "oom"
        write_summary(run_dir, summary)
        return summary["status"]
    status = "oom" if oom else "failed"
    failed_summary(run_dir, config=config, error=error, status=status, layout=layout.as_dict(),
                   stop_reason="watchdog" if stalled else "failed", launcher="unknown")
    log.error("run failed: %s", error)
    return status


@record
def rank_main(config: dict[str, Any], run_dir: str) -> None:
    """What every rank runs: join the process group, train, leave."""
    cfg = OmegaConf.create(config)
    launcher = cfg.launcher
    try:
        with rank_process(device=cfg.system.device, gpu_order=launcher.gpu_order,
                          pg_timeout_s=launcher.pg_timeout_s) as ctx:
            Trainer(cfg, ctx.info, ctx.device, Path(run_dir)).run()
    except (Terminated, KeyboardInterrupt) as exc:
        # Stopped by the launcher or the user: the summary is written; end without a traceback.
        raise SystemExit(128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)) from None
