"""A rank that dies ends the whole job quickly, and every finished step is already on disk."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import clean_env


def _a_worker(parent: psutil.Process) -> psutil.Process | None:
    """A rank spawned by the elastic agent (ranks get RANK after exec, so it is not in /proc/<pid>/environ)."""
    workers = [c for c in parent.children(recursive=True)
               if "spawn_main" in " ".join(c.cmdline()) and "resource_tracker" not in " ".join(c.cmdline())]
    return max(workers, key=lambda c: c.create_time(), default=None)


@pytest.mark.multirank
def test_killed_rank_ends_job_with_failed_summary_and_steps_kept(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "run", f"hydra.run.dir={run_dir}", "launcher.nproc=2",
         "launcher.omp_num_threads=1", "train.steps=100000", "train.warmup_steps=0"],
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    steps = run_dir / "steps.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not steps.exists() or len(steps.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    victim = _a_worker(psutil.Process(proc.pid))
    assert victim is not None, "no rank process found"
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    ended_after = time.monotonic() - killed_at
    assert proc.returncode != 0
    assert ended_after < 30, f"job took {ended_after:.1f}s to end after a rank died"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and re.match(r"rank \d failed", summary["error"]), summary["error"]
    finished = [json.loads(line) for line in steps.read_text().splitlines()]
    assert len(finished) >= 3 and [s["step"] for s in finished] == list(range(len(finished)))
    assert summary["metrics"]["timed_steps"] == len(finished)
