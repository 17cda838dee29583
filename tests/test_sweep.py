"""Sweeps a user can trust: listed before they run, and continued, not redone, after a wall-time kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import TINY, clean_env, harness


def _finished(sweep: Path) -> list[Path]:
    done = []
    for path in sweep.glob("*/summary.json"):
        try:
            if json.loads(path.read_text())["status"] == "ok":
                done.append(path.parent)
        except (OSError, ValueError):
            pass  # being written
    return sorted(done)


def test_a_sweep_cut_after_its_second_point_continues_where_it_stopped(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["run", "-m", *TINY, "train.micro_batch_size=1,2,4", f"hydra.sweep.dir={sweep}"]
    job = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], cwd=tmp_path, env=clean_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while len(_finished(sweep)) < 2 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # what a scheduler does when the wall time runs out
    job.wait()
    finished = _finished(sweep)
    assert len(finished) == 2, f"the sweep ended before its second point finished: {finished}"
    kept = {p: (p / "steps.jsonl").read_bytes() + (p / "summary.json").read_bytes() for p in finished}

    again = harness(args, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("finished earlier with the same config, skipped") == 2, again.stderr
    assert {p: (p / "steps.jsonl").read_bytes() + (p / "summary.json").read_bytes() for p in finished} == kept
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    assert sorted(s["config"]["train"]["micro_batch_size"] for s in summaries.values()) == [1, 2, 4]
    assert all(s["status"] == "ok" and s["metrics"]["timed_steps"] == 3 for s in summaries.values())

    # Another config in the same point directory is not "finished": it runs, the earlier run is kept aside.
    changed = harness(["run", "-m", *TINY, "train.seed=7", "train.micro_batch_size=1", f"hydra.sweep.dir={sweep}"],
                      cwd=tmp_path, timeout=300)
    assert changed.returncode == 0 and "moved to previous-1/" in changed.stderr, changed.stderr
    point = next(p for p in finished if p.name.startswith("0-"))
    assert json.loads((point / "summary.json").read_text())["config"]["train"]["seed"] == 7
    assert (point / "previous-1" / "steps.jsonl").read_bytes() + (point / "previous-1" / "summary.json").read_bytes() \
        == kept[point]


def test_dry_run_lists_and_checks_every_point_without_running_any(tmp_path: Path) -> None:
    proc = harness(["run", "-m", "+experiment=fsdp-study-cpu", "--dry-run"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "[ok: 2 rank(s)" in line]
    assert [line.split()[1] for line in lines] == [f"fsdp-study-cpu-b{b}-ac-{ac}" for b in (1, 2)
                                                   for ac in ("none", "full")]
    bad = harness(["run", "-m", *TINY, "train.global_batch_size=4", "train.micro_batch_size=1,3", "--dry-run"],
                  cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "[ok: 1 rank(s)" in bad.stdout, bad.stdout + bad.stderr
    assert "error: train.global_batch_size=4" in bad.stdout or "train.micro_batch_size=3" in bad.stdout, bad.stdout
    configs = harness(["run", "-m", *TINY, "train.micro_batch_size=1,2", "--cfg", "job"], cwd=tmp_path, timeout=120)
    assert configs.returncode == 0 and configs.stdout.count("# point ") == 2, configs.stderr
    assert "micro_batch_size: 2" in configs.stdout.split("# point 1 of 2")[1]
    assert not any(tmp_path.iterdir()), "a dry run made files"
