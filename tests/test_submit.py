"""`harness submit <system>`: the rendered job script per site, and bad requests refused before submission."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import main
from harness.launchers.jobscript import JobRequest, render

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_user_profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the package's system profiles: ones `harness calibrate` left in ~/.config would change the lists."""
    monkeypatch.setenv("HARNESS_CONFIG_DIR", str(tmp_path / "config"))


SITE_LINES = {
    "frontier": ["#SBATCH --account=abc123", "#SBATCH --nodes=2", "#SBATCH --time=01:30:00",
                 "#SBATCH --partition=batch", "--gpus-per-task=1 --gpu-bind=closest", "srun --kill-on-bad-exit=1",
                 "export FI_CXI_ATS=0", 'export MIOPEN_USER_DB_PATH="/tmp/miopen-cache-$SLURM_JOB_ID"',
                 "ranks_per_node=8", "overrides=(system=frontier model=gpt-tiny 'name=my run')"],
    "perlmutter": ["#SBATCH --account=abc123", "#SBATCH --qos=regular", "#SBATCH --constraint=gpu", "ranks_per_node=4",
                   "--cpus-per-task=32 --cpu-bind=cores", "overrides=(system=perlmutter model=gpt-tiny 'name=my run')"],
    "polaris": ["#PBS -A abc123", "#PBS -l select=2:system=polaris", "#PBS -l walltime=01:30:00", "#PBS -q debug",
                '--ppn "$ranks_per_node" --depth 8 --cpu-bind depth', "ranks_per_node=4",
                "overrides=(system=polaris launcher.gpu_order=reversed model=gpt-tiny 'name=my run')"],
    "aurora": ["#PBS -A abc123", "#PBS -l select=2", "ranks_per_node=12", "export CCL_PROCESS_LAUNCHER=pmix",
               'mpiexec -n "$ranks" --ppn "$ranks_per_node" --cpu-bind "$cpu_bind"',
               "overrides=(system=aurora model=gpt-tiny 'name=my run')"],
    "summit": ["SUMMIT WAS RETIRED IN NOVEMBER 2024", "#BSUB -P abc123", "#BSUB -nnodes 2", "#BSUB -W 1:30",
               "walltime_min=90", "ranks_per_node=6", "jsrun",
               "overrides=(system=summit model=gpt-tiny 'name=my run')"],
}


@pytest.mark.parametrize("site", SITE_LINES)
def test_dry_run_renders_the_site_script(site: str, capsys: pytest.CaptureFixture[str]) -> None:
    main(["submit", site, "--dry-run", "account=abc123", "nodes=2", "walltime=01:30:00", "--", "model=gpt-tiny",
          "name=my run"])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    for expected in SITE_LINES[site]:
        assert any(expected in line for line in lines), f"{expected!r} not in the {site} script:\n{out}"
    assert err.startswith(f"harness: dry run: would write results/jobs/scripts/{site}-")


def test_generic_cluster_gets_tasks_and_an_inserted_account(capsys: pytest.CaptureFixture[str]) -> None:
    main(["submit", "cpu", "--dry-run", "tasks=2", "account=proj7", "queue=short", "results=/scratch/a b"])
    out = capsys.readouterr().out
    assert "#SBATCH --ntasks=2\n" in out and "#SBATCH --account=proj7\n" in out
    assert "#SBATCH --partition=short\n" in out and "results_dir='/scratch/a b'\n" in out


def test_generic_cluster_asks_for_every_slot_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    main(["submit", "cpu", "--dry-run", "nodes=2"])
    assert "#SBATCH --ntasks=16\n" in capsys.readouterr().out  # 2 nodes x job.ranks_per_node=8


def test_job_env_is_exported_right_after_the_overrides() -> None:
    request = JobRequest(site="polaris", scheduler="pbs", script=ROOT / "scripts/pbs/polaris.pbs", ranks_per_node=4,
                         env={"NCCL_DEBUG": "INFO", "HARNESS_VENV": "/home/a b/venv"})
    lines = render(request).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("overrides=("))
    assert lines[at + 1: at + 3] == ["export NCCL_DEBUG=INFO", "export HARNESS_VENV='/home/a b/venv'"]


def _error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["submit", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(("args", "message"), [
    (["frontier", "nodes=2"], "frontier: account= is required (the allocation to charge, e.g. account=abc123)"),
    (["frontier", "account=a", "nodes=2", "tasks=17"],
     "tasks=17 does not fit nodes=2 x 8 ranks per node on frontier = 16; use nodes=3 or fewer tasks"),
    (["polaris", "account=a", "tasks=5"],
     "tasks=5 does not fit nodes=1 x 4 ranks per node on polaris = 4; use nodes=2 or fewer tasks"),
    (["frontier", "account=a", "walltime=90"], "walltime=90: use HH:MM:SS, e.g. walltime=00:30:00"),
    (["frontier", "account=a", "nodes=two"], "nodes=two: must be a whole number"),
    (["frontier", "account=a", "gpus=8"],
     "gpus=8: expected key=value with key one of account, nodes, walltime, queue, tasks, results, name "
     "(harness overrides go after --)"),
    (["lumi", "account=a"], "unknown system 'lumi'; choose one of: aurora, cpu, cuda,"),
    (["frontier", "account=a", "--", "model=gpt-9"], "model=gpt-9: unknown model; choose one of"),
    (["frontier", "account=a", "nodes=1", "--", "train.global_batch_size=12"],
     "train.global_batch_size=12 is not divisible by micro_batch_size*dp=1*8=8; use a multiple such as 8 or 16"),
])
def test_bad_requests_fail_before_submission_in_one_line(args: list[str], message: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert _error([args[0], "--dry-run", *args[1:]], capsys).startswith(f"harness: error: {message}")


def test_a_user_profile_with_a_job_block_is_submitted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Profiles `harness calibrate` writes live in the user's config directory, not the package's."""
    (tmp_path / "config/system").mkdir(parents=True)
    (tmp_path / "config/system/cpu-mine.yaml").write_text(
        "name: cpu-mine\ndevice: cpu\njob:\n  scheduler: slurm\n  script: scripts/slurm/generic.sbatch\n"
        "  ranks_per_node: 4\n")
    main(["submit", "cpu-mine", "--dry-run", "nodes=2"])
    assert "#SBATCH --ntasks=8\n" in capsys.readouterr().out
