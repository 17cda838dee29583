"""Hostile and careless input: nothing a user had is lost, nothing is mixed in, and every bad value is one
line and exit 2 from every command."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, clean_env, harness, harness_run

from harness.run.claim import RunDirLock
from harness.run.rundir import StepLog, read_steps_checked

ONE_LINE_ERRORS = [  # (command line, text the one line must contain)
    (["run", "train.steps=0"], "train.steps=0"),
    (["run", "train.foo=1"], "train.foo: unknown key"),
    (["run", "trian.steps=1"], "trian"),
    (["run", "model.n_layers=abc"], "model.n_layers=abc: not a whole number"),
    (["run", "model.ffn_hidden=0"], "model.ffn_hidden=0: must be at least 1"),
    (["run", "model.ffn_hidden=-8"], "model.ffn_hidden=-8"),
    (["run", "launcher.omp_num_threads=-1"], "launcher.omp_num_threads=-1"),
    (["run", "launcher.pg_timeout_s=0"], "launcher.pg_timeout_s=0"),
    (["run", "launcher.monitor_interval_s=-1"], "launcher.monitor_interval_s=-1"),
    (["run", "backend=deepspeed", "parallel.zero_stage=4"], "DeepSpeed's ZeRO stages are 0-3"),
    (["run", "backend=deepspeed3d", "launcher.nproc=2", "parallel.pp=2", "parallel.vpp=2"],
     "parallel.vpp=2: backend=deepspeed3d has no interleaved pipeline"),
    (["run", "parallel.vpp=2"], "parallel.vpp=2"),
    (["run", "backend.offload=true"], "backend.offload=True: backend=ddp has no such option"),
    (["run", "train.lr=0"], "train.lr=0"),
    (["run", "train.lr=nan"], "train.lr=nan: must be a finite number"),
    (["run", "train.lr=inf"], "train.lr=inf: must be a finite number"),
    (["estimate", "system.hbm_bw_gb_per_s=-inf"], "system.hbm_bw_gb_per_s=-inf: must be a finite number"),
    (["run", "hydra.run.dir=/tmp/ünïcode"], "quote the value: \"hydra.run.dir='/tmp/ünïcode'\""),
    (["run", "-m", "train.seed=1,2", "hydra.sweep.dir=/tmp/ünïcode"], "hydra.sweep.dir='/tmp/ünïcode'"),
    (["run", "launcher.nproc=2", "launcher.join=true"], "launcher.join=true but no launcher started this process"),
    (["run", "model=gpt-13b", "costmodel.software=megatorn-lm"],  # before the memory check: no rank starts
     "costmodel.software=megatorn-lm: unknown; choose one of harness-ddp, harness-fsdp"),
    (["estimate", "parallel.world_size=0"], "parallel.world_size=0: must be at least 1"),
    (["estimate", "parallel.world_size=-4"], "parallel.world_size=-4: must be at least 1"),
    (["estimate", "model.n_layers=abc"], "model.n_layers=abc"),
    (["estimate", "--jsn"], "--jsn: unknown option"),
    (["plan", "--top=abc"], "--top=abc"),
    (["plan", "--top=0"], "--top=0"),
    (["plan", "parallel.world_size=0"], "parallel.world_size=0"),
    (["calibrate", "launcher.nproc=0"], "launcher.nproc=0"),
    (["calibrate", "--name=../../x"], "--name=../../x"),
    (["calibrate", "--name=cpu"], "--name=cpu: a profile shipped with harness"),
    (["calibrate", "model=nope"], "model=nope: unknown model"),
    (["submit", "nowhere"], "unknown system 'nowhere'"),
    (["submit", "polaris", "--dry-run", "account=x", "--", "-m", "train.micro_batch_size=1,2"],
     "submit: -m: a sweep inside one job runs its points as srun steps"),
    (["submit", "cpu", "--dry-run", "tasks=2", "--", "-m", "train.global_batch_size=4", "train.micro_batch_size=1,3"],
     "sweep point 1 (train.micro_batch_size=3): train.global_batch_size=4"),
    (["nosuchcommand"], "unknown command 'nosuchcommand'"),
]


@pytest.mark.parametrize("args,needle", ONE_LINE_ERRORS, ids=[" ".join(a) for a, _ in ONE_LINE_ERRORS])
def test_every_command_answers_bad_input_in_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    proc = harness(args, cwd=tmp_path, timeout=60)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("harness: error: "), proc.stderr
    assert needle in lines[0], lines[0]
    assert not list(tmp_path.rglob("*.yaml")), "a config error must leave nothing behind"


@pytest.mark.parametrize("command", ["", "run", "estimate", "plan", "calibrate", "submit", "report", "data"])
def test_every_command_has_help(tmp_path: Path, command: str) -> None:
    proc = harness([command, "--help"] if command else ["--help"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: harness"), proc.stdout
    if not command:
        assert all(name in proc.stdout for name in ("run", "estimate", "plan", "calibrate", "submit"))


def test_a_config_error_never_touches_an_existing_directory(tmp_path: Path) -> None:
    """The bug: `run` removed whatever hydra.run.dir pointed to when validation failed."""
    earlier = tmp_path / "study"
    for name in ("run-a", "run-b"):
        (earlier / name).mkdir(parents=True)
        (earlier / name / "summary.json").write_text('{"status": "ok"}\n')
    (earlier / "notes.txt").write_text("mine\n")
    before = sorted(p.relative_to(earlier) for p in earlier.rglob("*"))
    for target in (earlier, Path(".")):
        proc = harness(["run", "train.steps=0", f"hydra.run.dir={target}"], cwd=earlier, timeout=60)
        assert proc.returncode == 2, proc.stderr
    assert sorted(p.relative_to(earlier) for p in earlier.rglob("*")) == before
    assert (earlier / "notes.txt").read_text() == "mine\n"


def test_a_run_directory_holds_one_run(tmp_path: Path) -> None:
    first = harness_run(tmp_path / "run", *TINY)
    steps = first.steps
    proc = harness(["run", *TINY, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "sweep.resume" in proc.stderr
    assert first.steps == steps and first.summary["metrics"]["timed_steps"] == 3


def test_a_locked_run_directory_is_refused(tmp_path: Path) -> None:
    """A second run started while the first holds the directory is refused, not interleaved."""
    run_dir = tmp_path / "busy"
    with RunDirLock(run_dir):
        proc = harness(["run", *TINY, f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "in use by another run" in proc.stderr, proc.stderr
    assert not (run_dir / "steps.jsonl").exists()


def test_step_log_cuts_a_failed_write_back_to_whole_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk met in the middle of a line (simulated: a short write, then ENOSPC)."""
    log = StepLog(tmp_path)
    log.write({"step": 0, "loss": 1.0})
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:7]))
    with pytest.raises(OSError) as info:
        log.write({"step": 1, "loss": 2.0})
    assert info.value.errno == errno.ENOSPC and "ENOSPC" in str(info.value)
    monkeypatch.undo()
    assert log.close() and "ENOSPC" in log.error
    steps, note = read_steps_checked(tmp_path)
    assert steps == [{"step": 0, "loss": 1.0}] and note is None
    assert not (tmp_path / ".summary-reserve").exists()


def test_a_torn_last_line_is_skipped_and_reported(tmp_path: Path) -> None:
    (tmp_path / "steps.jsonl").write_text('{"step": 0}\n{"step": 1}\n{"ste')
    steps, note = read_steps_checked(tmp_path)
    assert steps == [{"step": 0}, {"step": 1}] and "line(s) 3" in note


def mount_tmpfs(mount: Path, options: str) -> bool:
    """Mount a tmpfs (root only); under CI=true, where the runner is root, not being able to is a failure."""
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0 and os.environ.get("CI"):
        pytest.fail(f"cannot mount a tmpfs in CI: {done.stderr.decode().strip()}")
    return done.returncode == 0


@pytest.fixture
def tiny_filesystem(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 384 KiB tmpfs: room for the config and the summary reserve, then a few hundred steps."""
    mount = tmp_path / "tiny"
    if not mount_tmpfs(mount, "size=384k"):
        pytest.skip("mounting a tmpfs needs root (the simulated ENOSPC test covers the writer)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_ends_the_run_failed_with_every_line_whole(tiny_filesystem: Path) -> None:
    run_dir = tiny_filesystem / "run"
    proc = harness(["run", *TINY, "train.steps=100000", "telemetry.idle_s=0", f"hydra.run.dir={run_dir}",
                    "hydra.output_subdir=null"], cwd=tiny_filesystem.parent, timeout=300)
    assert proc.returncode == 1, proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "ENOSPC" in summary["error"], summary["error"]
    lines = (run_dir / "steps.jsonl").read_text().splitlines()
    assert len(lines) > 3 and all(json.loads(line)["step"] == i for i, line in enumerate(lines))
    assert summary["metrics"]["timed_steps"] == len(lines) - 1


def test_a_model_that_cannot_fit_is_refused_at_once(tmp_path: Path) -> None:
    start = time.perf_counter()
    proc = harness(["run", "model=gpt-13b"], cwd=tmp_path, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2 and elapsed < 5, (elapsed, proc.stderr)
    line = proc.stderr.strip()
    assert "GB per device" in line and "launcher.skip_memory_check=true" in line and "harness plan" in line


def test_a_token_file_of_partial_tokens_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens.bin"
    path.write_bytes(bytes(range(7)) * 1001)  # 7007 bytes: not a whole number of uint16 tokens
    proc = harness(["run", "data=tokens", f"data.path={path}"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "not a whole number of uint16 tokens" in proc.stderr, proc.stderr


def test_a_read_only_run_directory_fails_in_one_line(tmp_path: Path) -> None:
    """A read-only filesystem (a tmpfs mounted read-only; root ignores permission bits, not that)."""
    mount = tmp_path / "ro"
    if not mount_tmpfs(mount, "ro,size=64k"):
        mount.chmod(0o555)  # without root: permissions make it read-only instead
    try:
        for target in (mount, mount / "run"):
            proc = harness(["run", *TINY, f"hydra.run.dir={target}"], cwd=tmp_path, timeout=60)
            assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
            assert "is not writable" in proc.stderr
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_run_with_one_line_and_a_summary(tmp_path: Path, sig: signal.Signals) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", *TINY, "train.steps=100000",
                             "launcher.nproc=2", f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    steps = run_dir / "steps.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not steps.exists() or len(steps.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("harness: error:")]
    assert len(errors) == 1, stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["metrics"]["timed_steps"] >= 2
