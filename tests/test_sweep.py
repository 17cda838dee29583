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


def test_a_sweep_point_as_a_submitit_local_job_runs_its_ranks_as_tasks(tmp_path: Path) -> None:
    """hydra/launcher=local: the point is a job of submitit's local executor, sized from the point (2 tasks for
    launcher.nproc=2), whose tasks join as the run's ranks; the cluster path of hydra/launcher=slurm."""
    sweep = tmp_path / "sweep"
    proc = harness(["run", "-m", "hydra/launcher=local", *TINY, "launcher.nproc=2", f"hydra.sweep.dir={sweep}"],
                   cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "'tasks_per_node': 2" in proc.stderr + proc.stdout
    summary = json.loads((sweep / "0-gpt-tiny-ddp" / "summary.json").read_text())
    assert (summary["status"], summary["env"]["launcher"], summary["env"]["world_size"]) == ("ok", "submitit-local", 2)
    assert [json.loads(line)["step"] for line in (sweep / "0-gpt-tiny-ddp" / "steps.jsonl").read_text().splitlines()] \
        == [0, 1, 2, 3]


def test_each_cluster_job_is_sized_from_its_own_point() -> None:
    """The settings `harness submit` uses, from the system profile: ranks over nodes of job.ranks_per_node (else
    devices_per_node), one GPU per rank on GPU systems, the profile's partition and wall-time."""
    from harness.config.compose import compose
    from hydra_plugins.harness_sweep.slurm_launcher import job_resources

    frontier = job_resources(compose(["system=frontier", "parallel.world_size=16"]))
    assert frontier == {"nodes": 2, "tasks_per_node": 8, "gpus_per_node": 8, "partition": "batch", "timeout_min": 30}
    assert job_resources(compose(["system=cpu", "launcher.nproc=2"])) == {"nodes": 1, "tasks_per_node": 2,
                                                                          "timeout_min": 30}
    assert job_resources(compose(["system=cpu", "launcher.nproc=20"]))["nodes"] == 3  # 8 ranks per CPU node
