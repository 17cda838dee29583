"""The command line as a user meets it: bad input fails fast in one line, sweeps give a directory per point."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, harness, harness_run

BAD_INPUT = [
    (["model=gpt-nope"], "model=gpt-nope", "choose one of"),
    (["model.d_model=65"], "model.d_model=65", "n_heads"),
    (["launcher.nproc=2", "train.global_batch_size=3"], "train.global_batch_size=3", "multiple"),
    (["train.steps=0"], "train.steps=0", "at least 1"),
    (["data=tokens", "data.path=/no/such/tokens.bin"], "data.path=/no/such/tokens.bin", "no such file"),
    (["launcher.nproc=0"], "launcher.nproc=0", "at least 1"),
]


@pytest.mark.parametrize("overrides,field,fix", BAD_INPUT, ids=[b[1] for b in BAD_INPUT])
def test_bad_input_fails_fast_in_one_line(tmp_path: Path, overrides: list[str], field: str, fix: str) -> None:
    start = time.perf_counter()
    proc = harness(["run", *overrides], cwd=tmp_path, timeout=60)
    elapsed = time.perf_counter() - start
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert elapsed < 10, f"took {elapsed:.1f}s"
    assert len(lines) == 1 and lines[0].startswith("harness: error: "), proc.stderr
    assert field in lines[0] and fix in lines[0], lines[0]
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.json")), \
        "an invalid config must not leave a run behind"


def test_cfg_job_prints_composed_config(tmp_path: Path) -> None:
    proc = harness(["run", "model=gpt-125m", "--cfg", "job"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "d_model: 768" in proc.stdout and "name: ddp" in proc.stdout


def test_multirun_refuses_a_bad_point_before_any_runs_then_gives_each_point_its_directory(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["run", "-m", *TINY, "train.global_batch_size=4", f"hydra.sweep.dir={sweep}"]
    bad = harness([*args, "train.micro_batch_size=1,2,3"], cwd=tmp_path, timeout=300)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert "sweep point 2 (train.micro_batch_size=3): train.global_batch_size=4" in lines[0], lines[0]
    assert "nothing was run or changed" in lines[0] and not sweep.exists()
    proc = harness([*args, "train.micro_batch_size=1,2"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summaries = {json.loads(p.read_text())["config"]["train"]["micro_batch_size"]: json.loads(p.read_text())
                 for p in sweep.glob("*/summary.json")}
    assert sorted(summaries) == [1, 2]
    assert summaries[1]["status"] == summaries[2]["status"] == "ok"
    assert summaries[1]["layout"]["grad_accum"] == 4 and summaries[2]["layout"]["grad_accum"] == 2


def test_token_file_data(tmp_path: Path) -> None:
    tokens = np.random.default_rng(0).integers(0, 512, size=20_000, dtype=np.uint16)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    run = harness_run(tmp_path / "run", *TINY, "data=tokens", f"data.path={path}", "train.micro_batch_size=2")
    assert run.summary["status"] == "ok" and run.summary["config"]["data"]["path"] == str(path)
    assert all(np.isfinite(run.losses))


def test_token_file_with_ids_outside_the_vocabulary_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "tokens.bin"
    np.full(1000, 600, dtype=np.uint16).tofile(path)
    proc = harness(["run", "data=tokens", f"data.path={path}"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "model.vocab_size=512" in proc.stderr, proc.stderr
