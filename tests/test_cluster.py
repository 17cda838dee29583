"""The job scripts on a real (one-node) Slurm and a real Open MPI, and shellcheck on every script.

`.ci/provision-slurm.sh` sets them up (Debian's slurmctld/slurmd/munge, openmpi-bin, shellcheck).
Without them these tests skip with a message, except under CI (`CI=true`), where they fail.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, clean_env

from harness.launchers.jobscript import JobRequest, render

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "scripts").rglob("*") if p.is_file()) + sorted((ROOT / ".ci").iterdir())


@functools.cache
def _missing(tool: str, works: tuple[str, ...]) -> str | None:
    """Why `tool` cannot be tested here, or None. Asked once per session: a stopped slurmctld makes sinfo wait."""
    if shutil.which(tool) is None:
        return f"{tool} is not installed"
    try:
        done = subprocess.run(works, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return f"`{' '.join(works)}` did not answer in 30 s"
    return None if done.returncode == 0 else f"`{' '.join(works)}` failed: {done.stderr.strip()[:200]}"


def _need(tool: str, works: list[str]) -> None:
    """Skip (locally) or fail (CI=true) when `tool` is missing or `works` does not succeed."""
    why = _missing(tool, tuple(works))
    if why is not None:
        message = f"{why}; run .ci/provision-slurm.sh as root on Debian to test it"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def slurm() -> None:
    _need("sbatch", ["sinfo", "-h", "-o", "%a"])


def _job_env(tmp_path: Path) -> dict[str, str]:
    from torch.distributed.elastic.utils.distributed import get_free_port

    return dict(clean_env(), HARNESS_PYTHON=sys.executable, PYTHONPATH=str(ROOT),
                HARNESS_RESULTS_DIR=str(tmp_path / "results"), MASTER_PORT=str(get_free_port()))


def _rendered_sites(tmp_path: Path) -> list[Path]:
    """Every site template as `harness submit` renders it, with values that need quoting."""
    out = []
    for scheduler, script in [("slurm", "slurm/frontier.sbatch"), ("slurm", "slurm/perlmutter.sbatch"),
                              ("slurm", "slurm/generic.sbatch"), ("pbs", "pbs/polaris.pbs"),
                              ("pbs", "pbs/aurora.pbs"), ("lsf", "lsf/summit.lsf")]:
        request = JobRequest(site="x", scheduler=scheduler, script=ROOT / "scripts" / script, ranks_per_node=4,
                             account="abc123", nodes=2, tasks=7, results="/scratch/my results",
                             overrides=["model=gpt-1.3b", "name=a b's"], env={"NCCL_DEBUG": "INFO"})
        path = tmp_path / Path(script).name
        path.write_text(render(request))
        out.append(path)
    return out


def test_shellcheck_passes_on_every_script_and_every_rendered_one(tmp_path: Path) -> None:
    _need("shellcheck", ["shellcheck", "--version"])
    files = [*SCRIPTS, *_rendered_sites(tmp_path)]
    assert len(files) >= 12
    proc = subprocess.run(["shellcheck", "--shell=bash", *map(str, files)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def _run_dir_is_complete(run_dir: Path, job_id: str | None, launcher: str) -> dict:
    assert {"config.yaml", "steps.jsonl", "summary.json"} <= {p.name for p in run_dir.iterdir()}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["stop_reason"]) == ("ok", "completed"), summary["error"]
    assert (summary["env"]["launcher"], summary["env"]["world_size"], summary["env"]["job_id"]) == (
        launcher, 2, job_id)
    assert [json.loads(line)["step"] for line in (run_dir / "steps.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    return summary


@pytest.mark.multirank
def test_sbatch_generic_script_two_tasks(slurm: None, tmp_path: Path) -> None:
    proc = subprocess.run(
        ["sbatch", "--parsable", "--wait", "--ntasks=2", f"--output={tmp_path}/slurm-%j.out",
         str(ROOT / "scripts/slurm/generic.sbatch"), *TINY],
        cwd=tmp_path, env=_job_env(tmp_path), capture_output=True, text=True, timeout=240)
    job_id = proc.stdout.strip().split(";")[0]
    log = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert proc.returncode == 0, f"{proc.stderr}\n{log}"
    _run_dir_is_complete(tmp_path / "results" / job_id, job_id, "slurm")
    # The script found the end of the 30-minute allocation (SLURM_JOB_END_TIME, else squeue) for the walltime stop.
    end_time = int(re.search(rf"job {job_id} ends at (\d+)", log).group(1))  # type: ignore[union-attr]
    assert 0 < end_time - time.time() <= 30 * 60


@pytest.mark.multirank
def test_open_mpi_mpiexec_two_ranks(tmp_path: Path) -> None:
    _need("mpiexec", ["mpiexec", "--version"])
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        ["mpiexec", "-n", "2", "--allow-run-as-root", "--oversubscribe", sys.executable, "-m", "harness.cli", "run",
         f"hydra.run.dir={run_dir}", *TINY],
        cwd=tmp_path, env=_job_env(tmp_path), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _run_dir_is_complete(run_dir, None, "openmpi")


def _rank_process(job_id: str, procid: int) -> int | None:
    """The pid of task `procid` of Slurm job `job_id`, from the variables srun put in its environment."""
    wanted = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={procid}".encode(), b"SLURM_STEP_ID=0"}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or b"harness.cli" not in (entry / "cmdline").read_bytes():
                continue
            if wanted <= set((entry / "environ").read_bytes().split(b"\0")):
                return int(entry.name)
        except OSError:
            continue
    return None


def _job_running(job_id: str) -> bool:
    return bool(subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip())


@pytest.mark.multirank
def test_harness_submit_then_a_killed_rank_ends_the_slurm_job(slurm: None, tmp_path: Path) -> None:
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "submit", "cpu", "tasks=2", "walltime=00:05:00", f"results={results}",
         "--", *TINY, "train.steps=100000"],
        cwd=tmp_path, env=_job_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)  # type: ignore[union-attr]
    steps = results / job_id / "steps.jsonl"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and (not steps.exists() or len(steps.read_text().splitlines()) < 3):
            assert _job_running(job_id), "the job ended before its third step"
            time.sleep(0.5)
        victim = _rank_process(job_id, 1)
        assert victim is not None, "rank 1 of the job not found"
        os.kill(victim, 9)
        killed_at = time.monotonic()
        while _job_running(job_id) and time.monotonic() < killed_at + 90:
            time.sleep(0.5)
        ended_after = time.monotonic() - killed_at
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    assert ended_after < 30, f"the job took {ended_after:.1f} s to end after a rank died"
    summary = json.loads((results / job_id / "summary.json").read_text())
    assert (summary["status"], summary["stop_reason"], summary["env"]["job_id"]) == ("failed", "failed", job_id)
    finished = [json.loads(line)["step"] for line in steps.read_text().splitlines()]
    assert len(finished) >= 3 and finished == list(range(len(finished)))
    assert summary["metrics"]["timed_steps"] == len(finished) - 1


@pytest.mark.multirank
def test_harness_submit_runs_a_sweep_point_after_point_in_one_job(slurm: None, tmp_path: Path) -> None:
    """`harness submit cpu tasks=2 -- -m ...`: one Slurm job; its batch shell runs each point as an srun step of
    both tasks, each point in its own directory under the job's."""
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "submit", "cpu", "tasks=2", "walltime=00:10:00", f"results={results}",
         "--", "-m", *TINY, "train.micro_batch_size=1,2"],
        cwd=tmp_path, env=_job_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)  # type: ignore[union-attr]
    try:
        deadline = time.monotonic() + 300
        while _job_running(job_id) and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    points = sorted((results / job_id).glob("*/summary.json"))
    log = "".join(p.read_text() for p in tmp_path.glob("harness-*.out"))
    assert [p.parent.name for p in points] == ["0-gpt-tiny-ddp", "1-gpt-tiny-ddp"], log
    for point, micro_batch in zip(points, (1, 2)):
        summary = _run_dir_is_complete(point.parent, job_id, "slurm")
        assert summary["config"]["train"]["micro_batch_size"] == micro_batch


@pytest.mark.multirank
def test_a_sweep_through_the_launcher_plugin_runs_each_point_as_a_slurm_job(slurm: None, tmp_path: Path) -> None:
    """`harness run -m hydra/launcher=slurm system=cpu ...`: two points, two Slurm jobs sized from the points
    (2 tasks each), two completed run directories; the same command again submits nothing; `harness report`
    reads the sweep."""
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "harness.cli", "run", "-m", "hydra/launcher=slurm", "system=cpu", *TINY,
            "launcher.nproc=2", "train.micro_batch_size=1,2", f"hydra.sweep.dir={sweep}"]
    env = {k: v for k, v in _job_env(tmp_path).items() if k != "MASTER_PORT"}
    first = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert first.returncode == 0, first.stdout + first.stderr
    jobs = [json.loads((sweep / f"{i}-gpt-tiny-ddp" / "summary.json").read_text())["env"]["job_id"] for i in (0, 1)]
    summaries = [_run_dir_is_complete(sweep / f"{i}-gpt-tiny-ddp", job, "slurm") for i, job in enumerate(jobs)]
    assert [s["config"]["train"]["micro_batch_size"] for s in summaries] == [1, 2]
    assert len({s["env"]["job_id"] for s in summaries}) == 2  # one job per point
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and (again.stdout + again.stderr).count("finished earlier, not submitted") == 2
    report = subprocess.run([sys.executable, "-m", "harness.cli", "report", str(sweep)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0 and "Sweep over train.micro_batch_size" in report.stdout, report.stderr
