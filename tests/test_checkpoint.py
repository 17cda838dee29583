"""Checkpoints as a measured phase, and resume for real: 8 straight steps (saving after step 4 and 8) against 4
steps resumed from the step-4 checkpoint give the same losses on every backend (tolerance: 1e-6 relative; on one
CPU host they are bit-identical), DDP's checkpoint loads into another number of ranks, each save and load is timed
per rank, and bad input fails before any process starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import clean_env, harness

TOLERANCE = 1e-6
BASE = ["model=gpt-tiny", "launcher.omp_num_threads=1", "train.warmup_steps=0", "train.global_batch_size=4",
        "telemetry.idle_s=0"]
BACKENDS = {
    "ddp": ["backend=ddp", "launcher.nproc=2"],
    "fsdp": ["backend=fsdp", "launcher.nproc=2"],
    "deepspeed": ["backend=deepspeed", "parallel.zero_stage=1", "launcher.nproc=2"],
    "deepspeed3d": ["backend=deepspeed3d", "parallel.pp=2", "launcher.nproc=2"],
}


def losses(run_dir: Path) -> dict[int, float]:
    return {s["step"]: s["loss"] for s in map(json.loads, (run_dir / "steps.jsonl").read_text().splitlines())}


def run(run_dir: Path, *args: str) -> None:
    proc = harness(["run", f"hydra.run.dir={run_dir}", *BASE, *args], cwd=run_dir.parent, timeout=600,
                   env={**clean_env(), "HARNESS_AUTO_CALIBRATE": "0"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("backend", [
    "ddp", "fsdp", pytest.param("deepspeed", marks=pytest.mark.deepspeed),
    pytest.param("deepspeed3d", marks=pytest.mark.deepspeed)])
def test_resumed_training_continues_as_if_never_stopped(backend: str, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight, *BACKENDS[backend], "train.steps=8", "checkpoint.every=4")
    step4 = straight / "checkpoints" / "step-000004"
    run(resumed, *BACKENDS[backend], "train.steps=4", f"checkpoint.resume_from={step4}")
    want, got = losses(straight), losses(resumed)
    assert sorted(got) == [4, 5, 6, 7]
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=TOLERANCE), (step, loss, want[step])
    saves = [json.loads(line) for line in (straight / "checkpoints.jsonl").read_text().splitlines()]
    assert [s["step"] for s in saves] == [4, 8] and all(s["kind"] == "save" and s["ranks"] == 2 for s in saves)
    for s in saves:  # every rank timed; the slowest rank sets the aggregate rate
        assert s["bytes"] > 0 and 0 < s["seconds"]["min"] <= s["seconds"]["median"] <= s["seconds"]["max"]
        assert s["gb_per_s"] == pytest.approx(s["bytes"] / s["seconds"]["max"] / 1e9)
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["checkpoints"]["saves"] == 2 and summary["checkpoints"]["save_bytes"] == saves[-1]["bytes"]
    again = json.loads((resumed / "summary.json").read_text())["checkpoints"]
    assert again["resumed_at_step"] == 4 and again["load_s"] > 0


def test_an_asynchronous_save_blocks_training_less_and_resumes_the_same(tmp_path: Path) -> None:
    """checkpoint.async_save: torch.distributed.checkpoint.async_save stages in host memory and writes in the
    background; the record keeps the loop's wait apart from the write, and the checkpoint resumes like any other."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight, *BACKENDS["fsdp"], "train.steps=8", "checkpoint.every=4", "checkpoint.async_save=true")
    saves = [json.loads(line) for line in (straight / "checkpoints.jsonl").read_text().splitlines()]
    assert [s["step"] for s in saves] == [4, 8] and all(s["async"] for s in saves)
    assert all(s["blocking_seconds"]["max"] <= s["seconds"]["max"] for s in saves)
    run(resumed, *BACKENDS["fsdp"], "train.steps=4",
        f"checkpoint.resume_from={straight / 'checkpoints' / 'step-000004'}")
    want = losses(straight)
    for step, loss in losses(resumed).items():
        assert loss == pytest.approx(want[step], rel=TOLERANCE), step


def test_a_ddp_checkpoint_loads_into_another_number_of_ranks(tmp_path: Path) -> None:
    """torch.distributed.checkpoint reshards: 2 ranks save, 1 rank (gradient accumulation 2 instead) continues."""
    straight, one = tmp_path / "straight", tmp_path / "one"
    run(straight, *BACKENDS["ddp"], "train.steps=8", "checkpoint.every=4")
    run(one, "backend=ddp", "launcher.nproc=1", "train.steps=4",
        f"checkpoint.resume_from={straight / 'checkpoints' / 'step-000004'}")
    want = losses(straight)
    for step, loss in losses(one).items():
        assert loss == pytest.approx(want[step], rel=1e-5), step  # another reduction order: float rounding only


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-rank DDP run that saved after its 2nd step."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    run(run_dir, "train.steps=2", "checkpoint.every=2")
    return run_dir / "checkpoints" / "step-000002"


def test_bad_checkpoint_input_is_one_line_before_anything_starts(saved: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "harness-checkpoint.json").write_text(json.dumps({"complete": False}))
    (tmp_path / "file").write_text("x")
    cases = [
        ([f"checkpoint.resume_from={tmp_path / 'missing'}"], "no such directory"),
        ([f"checkpoint.resume_from={tmp_path}"], "not a harness checkpoint"),
        ([f"checkpoint.resume_from={cut}"], "did not finish"),
        (["model=gpt-125m", f"checkpoint.resume_from={saved}"], "saved from model gpt-tiny"),
        (["backend=fsdp", f"checkpoint.resume_from={saved}"], "saved by backend=ddp"),
        (["checkpoint.every=2", f"checkpoint.dir={tmp_path / 'file' / 'sub'}"], "cannot create it"),
        (["checkpoint.every=2", f"checkpoint.dir={saved.parent}"], "would write over"),
        (["checkpoint.every=-1"], "checkpoint.every=-1"),
        (["backend=deepspeed", "checkpoint.every=2", "checkpoint.async_save=true"], "checkpoint.async_save=true"),
    ]
    for args, words in cases:
        proc = harness(["run", f"hydra.run.dir={tmp_path / 'never'}", *BASE, "train.steps=2", *args], cwd=tmp_path,
                       env={**clean_env(), "HARNESS_AUTO_CALIBRATE": "0"})
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], (args, proc.stderr)
        assert not (tmp_path / "never").exists()  # nothing started, nothing written
    ok = harness(["run", f"hydra.run.dir={tmp_path / 'over'}", *BASE, "train.steps=2", "checkpoint.every=2",
                  f"checkpoint.dir={saved.parent}", "checkpoint.overwrite=true"], cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr


def test_report_shows_the_checkpoint_cost(saved: Path, tmp_path: Path) -> None:
    run_dir = saved.parent.parent
    proc = harness(["report", str(run_dir), "--view", "checkpoint", "--format", "json", "--out", str(tmp_path / "r")],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)["checkpoint"][0]
    record = json.loads((run_dir / "checkpoints.jsonl").read_text().splitlines()[0])
    assert row["saves"] == 1 and row["save s"] == pytest.approx(record["seconds"]["max"])
    assert row["GB"] == pytest.approx(record["bytes"] / 1e9)
    assert (tmp_path / "r" / "checkpoint.png").stat().st_size > 1000


def test_a_rank_that_dies_is_restarted_from_the_last_checkpoint(tmp_path: Path) -> None:
    """launcher.max_restarts=1 and the last rank killed at step 5 of the first attempt (train.fault_inject_crash_step,
    os._exit: no goodbye): torch elastic restarts both ranks, which resume from step-000004, redo step 4 and finish;
    the final trajectory is an uninterrupted run's, and the summary counts the restart, the lost step and a goodput
    below 1."""
    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    run(straight, *BACKENDS["ddp"], "train.steps=8")
    run(restarted, *BACKENDS["ddp"], "train.steps=8", "checkpoint.every=2", "launcher.max_restarts=1",
        "train.fault_inject_crash_step=5")
    summary = json.loads((restarted / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["metrics"]["timed_steps"] == 8
    resilience = summary["resilience"]
    assert resilience["restarts"] == 1 and resilience["lost_steps"] == 1 and 0 < resilience["goodput"] < 1
    event = resilience["restart_events"][0]
    assert event["resumed_at_step"] == 4 and event["detect_and_relaunch_s"] > 0 and event["resume_s"] > 0
    lines = [json.loads(line) for line in (restarted / "steps.jsonl").read_text().splitlines()]
    assert [(s["step"], s["attempt"]) for s in lines] == [*((k, 0) for k in range(5)), *((k, 1) for k in range(4, 8))]
    want = losses(straight)
    final = {s["step"]: s["loss"] for s in lines}  # each step's last attempt
    assert all(final[k] == pytest.approx(want[k], rel=TOLERANCE) for k in range(8)), (final, want)


def test_a_sweep_over_the_checkpoint_interval_reports_its_cost(tmp_path: Path) -> None:
    """The study a user runs to choose an interval: a sweep over checkpoint.every, whose report picks the checkpoint
    view by itself, a row per point."""
    sweep = tmp_path / "sweep"
    proc = harness(["run", "-m", f"hydra.sweep.dir={sweep}", *BASE, "train.steps=4", "checkpoint.every=1,2"],
                   cwd=tmp_path, env={**clean_env(), "HARNESS_AUTO_CALIBRATE": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    tables = json.loads(harness(["report", str(sweep), "--format", "json"], cwd=tmp_path).stdout)
    rows = sorted(tables["checkpoint"], key=lambda r: -r["saves"])
    assert [r["saves"] for r in rows] == [4, 2] and all(r["save s"] > 0 for r in rows)
