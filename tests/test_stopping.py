"""Runs stop early for the right reason, write their summary, and say why (`stop_reason`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import TINY, clean_env

from harness.run.stopping import job_end_time, out_of_time


@pytest.mark.parametrize(("env", "end"), [
    ({}, None),
    ({"SLURM_JOB_END_TIME": "1795000000"}, 1795000000.0),
    ({"HARNESS_JOB_END_TIME": "1795000100", "SLURM_JOB_END_TIME": "1795000000"}, 1795000100.0),
    ({"HARNESS_JOB_END_TIME": ""}, None),                      # squeue said UNLIMITED: the script leaves it empty
    ({"HARNESS_JOB_END_TIME": "", "SLURM_JOB_END_TIME": "1795000000"}, 1795000000.0),
    ({"SLURM_JOB_END_TIME": "0"}, None),
])
def test_job_end_time(env: dict[str, str], end: float | None) -> None:
    assert job_end_time(env) == end


@pytest.mark.parametrize(("now", "last_step", "margin", "stop"), [
    (1000.0, 10.0, 60.0, False), (1030.0, 10.0, 60.0, True), (1029.9, 10.0, 60.0, False),
])
def test_out_of_time(now: float, last_step: float, margin: float, stop: bool) -> None:
    assert out_of_time(1100.0, now, last_step, margin) is stop
    assert out_of_time(None, now, last_step, margin) is False


def _start(run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "run", f"hydra.run.dir={run_dir}", "launcher.nproc=2", *TINY,
         "train.steps=100000", *overrides],
        cwd=run_dir.parent, env=env or clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.multirank
def test_walltime_stops_every_rank_cleanly_before_the_allocation_ends(tmp_path: Path) -> None:
    end_time = int(time.time()) + 40  # start-up takes 8-30 s here, depending on the load
    env = dict(clean_env(), HARNESS_JOB_END_TIME=str(end_time))
    proc = _start(tmp_path / "run", "launcher.walltime_margin_s=2", "train.warmup_steps=0", env=env)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["status"], summary["stop_reason"]) == ("ok", "walltime")
    steps = (tmp_path / "run" / "steps.jsonl").read_text().splitlines()
    assert summary["metrics"]["timed_steps"] == len(steps) >= 1
    written = (tmp_path / "run" / "summary.json").stat().st_mtime
    assert written < end_time, f"the summary was written {written - end_time:.1f} s after the allocation ended"


def _workers(parent: psutil.Process) -> list[psutil.Process]:
    """The ranks the elastic agent spawned, oldest (local rank 0) first."""
    workers = [c for c in parent.children(recursive=True)
               if "spawn_main" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())]
    return sorted(workers, key=lambda c: c.create_time())


@pytest.mark.multirank
def test_watchdog_ends_a_run_that_stops_making_progress(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "launcher.watchdog_s=4")
    steps = run_dir / "steps.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not steps.exists() or len(steps.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    workers = _workers(psutil.Process(proc.pid))
    assert len(workers) == 2, workers
    workers[1].suspend()  # rank 1 hangs without dying: rank 0 waits in its all-gather, no collective error yet
    stopped_at = time.monotonic()
    summary_path = run_dir / "summary.json"
    while time.monotonic() < stopped_at + 60 and not summary_path.exists():
        time.sleep(0.2)
    noticed_after = time.monotonic() - stopped_at
    workers[1].resume()  # let the agent's SIGTERM reach it
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    summary = json.loads(summary_path.read_text())
    assert (summary["status"], summary["stop_reason"]) == ("failed", "watchdog"), summary["error"]
    assert "StalledRun: no step finished in" in summary["error"]
    assert noticed_after < 4 + 10, f"the watchdog took {noticed_after:.1f} s"
    finished = [json.loads(line) for line in steps.read_text().splitlines()]
    assert len(finished) >= 3 and summary["metrics"]["timed_steps"] == len(finished) - 1
