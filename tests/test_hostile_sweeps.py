"""The hostile-input pass over sweeps and the edges of every command, kept fixed: results a sweep must never
lose or corrupt, job scripts nobody can inject into, launcher variables that disagree with the config,
divergence and signals as statuses, and one line (never a traceback) for every bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, clean_env, harness, harness_run
from test_hostile import mount_tmpfs

SWEEP = ["run", "-m", *TINY]
LONG = ["train.steps=100000", "telemetry.idle_s=0"]


def snapshot(root: Path, growing: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file and directory below `root` with its checksum (files named in `growing`: their size only grows,
    checked separately), so that 'nothing changed' is a byte-level claim."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            out[rel] = "dir"
        elif path.name not in growing:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "growing"
    return out


def one_line(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The one error line; a config error (exit 2) is all there is, a failure later may follow progress lines."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if code != 2:
        lines = [line for line in lines if not line.startswith("harness: ") or line.startswith("harness: error: ")]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("harness: error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + (proc.stdout or "")
    return lines[0]


def start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], cwd=cwd, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(proc: subprocess.Popen[str], steps: Path, count: int = 3, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if steps.exists() and len(steps.read_text().splitlines()) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{steps} did not reach {count} steps")


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two finished points, shared by the tests that must leave a finished sweep exactly as it was."""
    root = tmp_path_factory.mktemp("finished")
    proc = harness([*SWEEP, "train.micro_batch_size=1,2", f"hydra.sweep.dir={root / 'sweep'}"], cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root / "sweep"


# -- results a sweep must never lose or corrupt -------------------------------------------------------------------

def test_a_second_sweep_into_a_live_sweep_leaves_its_files_byte_identical(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    live = start([*SWEEP, *LONG, "train.micro_batch_size=1,2", f"hydra.sweep.dir={sweep}"], tmp_path)
    try:
        steps = sweep / "0-gpt-tiny-ddp" / "steps.jsonl"
        wait_for_steps(live, steps)
        before, lines = snapshot(sweep, growing=("steps.jsonl",)), steps.read_bytes()
        for args in ([*SWEEP, "train.micro_batch_size=1,2", f"hydra.sweep.dir={sweep}"],
                     [*SWEEP, "train.micro_batch_size=1,2", "sweep.resume=false", f"hydra.sweep.dir={sweep}"],
                     ["run", *TINY, f"hydra.run.dir={sweep / '0-gpt-tiny-ddp'}"]):
            line = one_line(harness(args, cwd=tmp_path))
            assert "in use by another run" in line or "already holds a run" in line, line
        assert snapshot(sweep, growing=("steps.jsonl",)) == before
        assert steps.read_bytes().startswith(lines)  # only the live run appended to its own steps
    finally:
        live.send_signal(signal.SIGINT)
        live.communicate(timeout=120)
    summary = json.loads((sweep / "0-gpt-tiny-ddp" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["config"]["train"]["steps"] == 100000
    assert summary["metrics"]["timed_steps"] >= 2 and not (sweep / "0-gpt-tiny-ddp" / "previous-1").exists()


@pytest.mark.parametrize("change", [["train.global_batch_size=3"], ["train.stepz=3"], ["sweep.resume=false"],
                                    ["train.lr=nan"], ["model.n_heads=5"]],
                         ids=["bad-batch", "typo", "no-resume", "nan", "bad-model"])
def test_a_refused_sweep_over_a_finished_one_changes_nothing(finished_sweep: Path, change: list[str]) -> None:
    before = snapshot(finished_sweep)
    proc = harness([*SWEEP, "train.micro_batch_size=1,2", *change, f"hydra.sweep.dir={finished_sweep}"],
                   cwd=finished_sweep.parent)
    line = one_line(proc)
    assert change[0].split("=")[0].replace("stepz", "steps") in line or "model.d_model" in line, line
    assert snapshot(finished_sweep) == before


def test_a_rerun_skips_finished_points_and_moves_a_changed_point_aside_whole(finished_sweep: Path,
                                                                               tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    shutil.copytree(finished_sweep, sweep)
    before = snapshot(sweep, growing=("multirun.yaml",))  # Hydra's record of the latest invocation of the sweep
    again = harness([*SWEEP, "train.micro_batch_size=1,2", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert again.returncode == 0 and again.stderr.count("finished earlier with the same config, skipped") == 2
    assert snapshot(sweep, growing=("multirun.yaml",)) == before
    dry = harness([*SWEEP, "train.micro_batch_size=1,2", "train.seed=7", f"hydra.sweep.dir={sweep}", "--dry-run"],
                  cwd=tmp_path)
    assert dry.returncode == 0 and dry.stdout.count("an earlier run moved to previous-<n>/") == 2, dry.stdout
    assert snapshot(sweep, growing=("multirun.yaml",)) == before
    changed = harness([*SWEEP, "train.micro_batch_size=1", "train.seed=7", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert changed.returncode == 0 and "moved to previous-1/" in changed.stderr, changed.stderr
    point = sweep / "0-gpt-tiny-ddp"
    moved = {k.removeprefix("previous-1/"): v for k, v in snapshot(point).items() if k.startswith("previous-1/")}
    earlier = {k.removeprefix("0-gpt-tiny-ddp/"): v for k, v in before.items() if k.startswith("0-gpt-tiny-ddp/")}
    assert moved == earlier and ".hydra/config.yaml" in moved  # all of it, Hydra's record included
    assert json.loads((point / "summary.json").read_text())["config"]["train"]["seed"] == 7
    assert "seed=7" in (point / ".hydra" / "overrides.yaml").read_text()


def test_a_directory_the_harness_did_not_make_is_refused(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    (mine / ".hydra").mkdir(parents=True)
    (mine / "config.yaml").write_text("my: own\n")
    (mine / ".hydra" / "config.yaml").write_text("also: mine\n")
    before = snapshot(mine)
    for extra in ([], ["launcher.allow_nonempty_dir=true"]):
        line = one_line(harness(["run", *TINY, f"hydra.run.dir={mine}", *extra], cwd=tmp_path))
        assert str(mine) in line and ("not made by harness" in line or "which a run would write" in line), line
    line = one_line(harness([*SWEEP, "train.seed=1,2", f"hydra.sweep.dir={mine}"], cwd=tmp_path))
    assert "is not a harness sweep" in line, line
    assert snapshot(mine) == before
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("kept\n")
    harness_run(notes, *TINY, "launcher.allow_nonempty_dir=true")  # beside the user's file, never over it
    assert (notes / "notes.txt").read_text() == "kept\n" and (notes / "summary.json").exists()


@pytest.mark.parametrize("target", ["file", "dangling"])
def test_a_run_directory_that_is_a_file_or_a_broken_link_is_one_line(tmp_path: Path, target: str) -> None:
    path = tmp_path / target
    if target == "file":
        path.write_text("x\n")
    else:
        path.symlink_to(tmp_path / "nowhere" / "x")
    for key, args in (("hydra.run.dir", ["run", *TINY]), ("hydra.sweep.dir", [*SWEEP, "train.seed=1,2"])):
        line = one_line(harness([*args, f"{key}={path}"], cwd=tmp_path))
        assert "is a file" in line or "does not exist" in line, line


# -- job scripts nobody can inject into ---------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["abc\n#SBATCH --uid=0", "abc --uid=0", "abc;id", "x\x1b[2J"])
def test_the_slurm_sweep_launcher_refuses_a_value_that_would_add_to_its_job_script(value: str) -> None:
    from harness.core.errors import ConfigError
    from harness.run.sweep import check_launcher_strings
    from hydra_plugins.harness_sweep.slurm_launcher import SlurmSweepLauncher

    with pytest.raises(ConfigError, match=r"^hydra\.launcher\.account="):
        check_launcher_strings({"account": value, "setup": ["export A=1"]})
    with pytest.raises(ConfigError, match=r"hydra\.launcher\.setup\[1\]"):
        check_launcher_strings({"setup": ["export A=1", "echo\nid"]})
    launcher = SlurmSweepLauncher.__new__(SlurmSweepLauncher)  # its own check, before any job script is written
    launcher.params, launcher.config, launcher.hydra_context = {"account": value}, object(), object()
    with pytest.raises(ConfigError, match="hydra.launcher.account"):
        launcher.launch([["train.seed=1"]], 0)


def test_a_sweep_with_an_injected_launcher_value_in_an_experiment_is_refused(tmp_path: Path,
                                                                             user_config_dir: Path) -> None:
    experiment = user_config_dir / "experiment" / "evil-sweep.yaml"
    experiment.parent.mkdir(exist_ok=True)
    experiment.write_text("# @package _global_\nhydra:\n  launcher:\n    name: \"abc\\n#SBATCH --uid=0\"\n")
    try:
        line = one_line(harness([*SWEEP, "hydra/launcher=local", "+experiment=evil-sweep", "train.seed=1,2"],
                                cwd=tmp_path))
    finally:
        experiment.unlink()
    assert "hydra.launcher.name=abc\\n#SBATCH --uid=0: must be one line" in line, line
    assert not list(tmp_path.rglob("*.sh")) and not (tmp_path / "results").exists()


def test_a_slurm_sweep_off_a_cluster_is_one_line(tmp_path: Path) -> None:
    env = {**clean_env(), "PATH": str(Path(sys.executable).parent)}  # no sbatch on it
    proc = subprocess.run([sys.executable, "-m", "harness.cli", *SWEEP, "hydra/launcher=slurm", "train.seed=1,2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "sbatch, which is not on this host's PATH" in one_line(proc)


# -- launcher variables against the config ------------------------------------------------------------------------

@pytest.mark.parametrize("env, needle", [
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}, "launcher.nproc=2 but slurm started this process as rank 0 "
                                                         "of 1 (1 on this node, from SLURM_PROCID=0, "
                                                         "SLURM_STEP_NUM_TASKS=1)"),
    ({"SLURM_PROCID": "abc", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_PROCID='abc' is not a whole number"),
], ids=["srun-pty", "not-a-number"])
def test_scheduler_variables_that_disagree_with_the_config_are_refused(tmp_path: Path, env: dict[str, str],
                                                                       needle: str) -> None:
    proc = harness(["run", *TINY, "launcher.nproc=2", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                   env={**clean_env(), **env})
    assert needle in one_line(proc) and not (tmp_path / "run").exists()


def test_launcher_join_false_starts_the_configured_ranks_and_records_them(tmp_path: Path) -> None:
    proc = harness(["run", *TINY, "launcher.nproc=2", "launcher.join=false", f"hydra.run.dir={tmp_path / 'run'}"],
                   cwd=tmp_path, env={**clean_env(), "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"})
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["layout"]["world_size"] == summary["config"]["launcher"]["nproc"] == 2


# -- divergence and signals are statuses --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["ddp", pytest.param("deepspeed", marks=pytest.mark.deepspeed)])
def test_a_diverging_run_ends_diverged_naming_the_step(tmp_path: Path, backend: str) -> None:
    run_dir = tmp_path / "run"
    proc = harness(["run", *TINY, f"backend={backend}", "train.lr=1e30", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    line = one_line(proc, code=1)
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [json.loads(s) for s in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert summary["status"] == summary["stop_reason"] == "diverged" and "run diverged" in line
    bad = steps[-1]
    assert bad["loss"] is None and bad["nonfinite"]["loss"] == "nan" and f"at step {bad['step']}" in line
    assert len(steps) < 4 and all(s["loss"] is not None for s in steps[:-1])
    report = harness(["report", str(run_dir), "--format", "json"], cwd=tmp_path)
    assert json.loads(report.stdout)["sweep"][0]["status"] == "diverged", report.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_whole_sweep_and_a_rerun_continues_it(tmp_path: Path, sig: signal.Signals) -> None:
    sweep = tmp_path / "sweep"
    args = [*SWEEP, "launcher.nproc=2", "train.seed=1,2,3", f"hydra.sweep.dir={sweep}"]
    proc = start([*args, *LONG], tmp_path)
    wait_for_steps(proc, sweep / "0-gpt-tiny-ddp" / "steps.jsonl")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("harness: error:")]
    assert len(errors) == 1 and f"interrupted by {sig.name}" in errors[0] and "Traceback" not in stderr, stderr
    summary = json.loads((sweep / "0-gpt-tiny-ddp" / "summary.json").read_text())
    assert summary["status"] == summary["stop_reason"] == "interrupted" and summary["metrics"]["timed_steps"] >= 2
    assert not (sweep / "1-gpt-tiny-ddp").exists() and not (sweep / "2-gpt-tiny-ddp").exists()
    rerun = harness([*args, "--dry-run"], cwd=tmp_path)  # the interrupted point runs again, the rest for the first time
    assert rerun.returncode == 0 and rerun.stdout.count("previous-<n>") == 1, rerun.stdout


# -- one line, never a traceback ----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["", "run", "estimate", "plan", "search", "calibrate", "submit", "report", "data"])
def test_help_into_a_closed_pipe_ends_quietly(tmp_path: Path, command: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *filter(None, [command]), "--help"], cwd=tmp_path,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before the first write: every write meets EPIPE
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and stderr == b"", stderr.decode()


def test_a_run_piped_into_head_finishes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shell = (f"{sys.executable} -m harness.cli run {' '.join(TINY)} launcher.nproc=2 hydra.run.dir={run_dir} "
             "| head -1")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", shell], cwd=tmp_path, env=clean_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stdout.splitlines()) == 1
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "ok"


def test_stdout_on_a_full_device_is_named(tmp_path: Path) -> None:
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "harness.cli", "estimate", "--json"], cwd=tmp_path,
                              env=clean_env(), stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert "writing to stdout failed: ENOSPC" in one_line(proc, code=1)


def test_a_full_disk_before_the_first_write_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    mount = tmp_path / "full"
    if not mount_tmpfs(mount, "size=64k"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        (mount / "fill").write_bytes(b"\0" * 64 * 1024)  # fills it
    except OSError:
        pass
    try:
        for args in (["run", *TINY, f"hydra.run.dir={mount / 'run'}"],
                     [*SWEEP, "train.seed=1,2", f"hydra.sweep.dir={mount / 'sweep'}"]):
            assert "no room for a run" in one_line(harness(args, cwd=tmp_path), code=1)
        assert sorted(p.name for p in mount.iterdir()) == ["fill"]
        (tmp_path / "report-runs").mkdir()
        harness_run(tmp_path / "report-runs" / "run", *TINY)
        line = one_line(harness(["report", str(tmp_path / "report-runs"), "--out", str(mount / "report")],
                                cwd=tmp_path), code=1)
        assert "report: writing" in line and "ENOSPC" in line, line
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_report_reads_every_run_beside_a_summary_that_is_not_an_object(tmp_path: Path) -> None:
    for name, text in (("list", "[1, 2]"), ("number", "3"), ("torn", '{"status": "o'), ("odd", '{"config": [1]}')):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "summary.json").write_text(text)
    harness_run(tmp_path / "runs" / "good", *TINY)
    proc = harness(["report", str(tmp_path / "runs"), "--format", "json"], cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    statuses = [r["status"] for r in json.loads(proc.stdout)["sweep"]]  # in path order: good, list, number, odd, torn
    assert statuses == ["ok", "unreadable", "unreadable", "unreadable", "unreadable"], statuses
    assert proc.stderr.count("harness: warning:") == 4


def test_a_malformed_profile_in_the_user_config_directory_is_one_line(tmp_path: Path, user_config_dir: Path) -> None:
    profile = user_config_dir / "system" / "broken-profile.yaml"
    profile.parent.mkdir(exist_ok=True)
    profile.write_text("name: [unclosed\n  peak: :\n")
    try:
        for args in (["estimate", "system=broken-profile"], ["run", "system=broken-profile"],
                     ["submit", "broken-profile", "--dry-run"]):
            line = one_line(harness(args, cwd=tmp_path))
            assert f"{profile}, line 2: not valid YAML" in line, line
    finally:
        profile.unlink()


def test_plan_says_why_nothing_was_ranked(tmp_path: Path) -> None:
    from collections import Counter

    from omegaconf import OmegaConf

    from harness.predict.plan import why_none

    line = one_line(harness(["plan", "model.n_heads=5", "system=dgx-a100-80gb", "parallel.world_size=8",
                             "train.global_batch_size=16"], cwd=tmp_path))
    assert "model.d_model=64 is not divisible by model.n_heads=5" in line, line
    line = one_line(harness(["plan", "system=dgx-a100-80gb", "parallel.world_size=6", "train.global_batch_size=7",
                             "--exact"], cwd=tmp_path), code=1)
    assert "no arrangement tp x pp x dp" in line and "memory" not in line, line
    cfg = OmegaConf.create({"train": {"global_batch_size": 8}, "system": {"devices_per_node": 8, "memory_gb": 80}})
    refused = Counter({"structures": 4, "fit": 3, "refused by validate: parallel.pp=2: needs 4 micro-batches": 3})
    assert why_none(refused, cfg) == ("the 3 layout(s) that fit were refused by the config checks (first: "
                                      "parallel.pp=2: needs 4 micro-batches)")
    assert "none fits in 80 GB" in why_none(Counter({"structures": 4, "pruned: does not fit": 9}), cfg)


def test_search_with_failed_trials_reports_no_importance_instead_of_failing() -> None:
    import optuna

    from harness.predict.search import MIN_IMPORTANCE_TRIALS, _importance

    study = optuna.create_study(direction="maximize")
    for value in (1.0, None):
        study.add_trial(optuna.trial.create_trial(
            params={"tp": 1}, distributions={"tp": optuna.distributions.CategoricalDistribution([1, 2])}, value=value,
            state=optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL))
    importance = _importance(study)
    assert importance["values"] is None and f"needs {MIN_IMPORTANCE_TRIALS} or more" in importance["reason"]


def test_an_override_with_a_newline_is_one_printable_line(tmp_path: Path) -> None:
    injected = "hydra.launcher.name=x\n#SBATCH --uid=0"
    line = one_line(harness([*SWEEP, "hydra/launcher=local", injected, "train.seed=1,2"], cwd=tmp_path))
    assert line.isprintable() and "an override must be one line" in line, line


def test_a_quoted_unicode_directory_runs(tmp_path: Path) -> None:
    run_dir = tmp_path / "ünï"
    proc = harness(["run", *TINY, f"hydra.run.dir='{run_dir}'"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "ok"
