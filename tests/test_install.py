"""`pip install .` (a wheel, not an editable install) works from any directory, as cluster users install tools:
the config groups and job scripts ship in the package, and calibrated profiles go to the user's directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import clean_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the harness wheel installed. torch and the other dependencies come
    from this environment through a .pth file (appended after the venv's own site-packages, so the wheel's
    harness wins over the checkout's editable one, whose import hook a .pth-added path does not run)."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "results", "tests", "*.egg-info", "__pycache__", ".*_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-v", "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    # The build prints no warning of the project's making (a license table, deprecated metadata); -v shows them all.
    project_warnings = [line for line in (built.stdout + built.stderr).splitlines()
                        if "deprecat" in line.lower() or ("warning" in line.lower() and "byte-compil" not in line)]
    assert not project_warnings, project_warnings
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    site = Path(subprocess.run([str(env_dir / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz-harness-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next((tmp / "dist").glob("gpt_train_harness-*.whl"))
    installed = subprocess.run([str(env_dir / "bin" / "pip"), "install", "--no-deps", "--ignore-installed",
                                "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return env_dir


def run_installed(venv: Path, cwd: Path, *args: str, config_dir: Path | None = None,
                  timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = clean_env()
    if config_dir is not None:
        env["HARNESS_CONFIG_DIR"] = str(config_dir)
    return subprocess.run([str(venv / "bin" / "harness"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_installed_package_is_not_the_checkout_and_has_one_import_root(venv: Path, tmp_path: Path) -> None:
    found = subprocess.run([str(venv / "bin" / "python"), "-c", "import harness, harness.launchers, harness.models; "
                            "print(harness.__file__, harness.launchers.__file__, harness.models.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, env=clean_env())
    assert found.returncode == 0, found.stderr
    assert all(Path(p).is_relative_to(venv) for p in found.stdout.split()), found.stdout
    wheel = next(venv.parent.glob("dist/gpt_train_harness-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()
            if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"harness", "hydra_plugins"}, tops  # no generic top-level `models` or `launchers`


def test_run_and_estimate_from_an_empty_directory(venv: Path, tmp_path: Path) -> None:
    run = run_installed(venv, tmp_path, "run", "launcher.nproc=2", "train.steps=2", "telemetry.idle_s=0")
    assert run.returncode == 0, run.stderr
    summary = json.loads(next(tmp_path.glob("results/runs/*/*/summary.json")).read_text())
    assert summary["status"] == "ok" and summary["layout"]["world_size"] == 2
    estimate = run_installed(venv, tmp_path, "estimate", "model=gpt-1t", "system=frontier", "backend=deepspeed3d",
                             "parallel.tp=8", "parallel.pp=64", "parallel.world_size=3072", "--json")
    assert estimate.returncode == 0, estimate.stderr
    assert json.loads(estimate.stdout)["params"] > 1e12


def test_calibrated_profile_goes_to_the_user_directory_and_runs_find_it(venv: Path, tmp_path: Path) -> None:
    config_dir = tmp_path / "user-config"
    calibrate = run_installed(venv, tmp_path, "calibrate", "launcher.nproc=1", "--name=my-host", config_dir=config_dir)
    assert calibrate.returncode == 0, calibrate.stderr
    profile = config_dir / "system" / "my-host.yaml"
    assert profile.exists()
    assert not list(venv.rglob("my-host.yaml")), "the profile must not be written into the installed package"
    run = run_installed(venv, tmp_path, "run", "system=my-host", "train.steps=2", "telemetry.idle_s=0",
                        "hydra.run.dir=run", config_dir=config_dir)
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["system"]["name"] == "my-host"
    assert summary["prediction"]["iter_time_ms"] > 0  # the calibrated peak times the run; `cpu` has none


def test_job_scripts_ship_in_the_package(venv: Path, tmp_path: Path) -> None:
    proc = run_installed(venv, tmp_path, "submit", "polaris", "--dry-run", "account=MyProject", "nodes=2",
                         "--", "model=gpt-1.3b", "backend=fsdp")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#!/bin/bash") and "#PBS -A MyProject" in proc.stdout
