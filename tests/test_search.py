"""`harness search`: the cost model's best-ranked layouts run first, the sampler proposes the rest, every trial is a
real run whose measurement stands next to its prediction, and a failing trial does not end the search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CALIBRATED, harness


@pytest.mark.multirank
def test_a_four_trial_search_on_two_cpu_ranks(calibrated_cpu: Path, tmp_path: Path) -> None:
    out = tmp_path / "search"
    proc = harness(["search", f"system={CALIBRATED}", "model=gpt-tiny", "launcher.nproc=2",
                    "launcher.omp_num_threads=1", "train.warmup_steps=1", "train.steps=2",
                    "train.global_batch_size=8", "search.trials=4", "search.seeds=2", f"search.dir={out}"],
                   cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "search.json").read_text())
    trials = result["trials"]
    assert [t["source"] for t in trials] == ["cost model", "cost model", "sampler", "sampler"]
    layouts = [(t["devices"], t["layout"]) for t in trials]
    assert len(set(layouts)) == 4 and all(devices in (1, 2) for devices, _ in layouts)  # distinct, within budget
    for t in trials:
        summary = json.loads((Path(t["run_dir"]) / "summary.json").read_text())
        assert summary["status"] == t["status"]
        if t["status"] == "ok":
            assert t["measured_tokens_per_s"] == summary["metrics"]["tokens_per_s"] > 0
            assert t["predicted_tokens_per_s"] == summary["prediction"]["tokens_per_s"] > 0
            assert t["prediction_error"] == pytest.approx(t["predicted_tokens_per_s"] / t["measured_tokens_per_s"] - 1)
    best = max((t for t in trials if t["measured_tokens_per_s"]), key=lambda t: t["measured_tokens_per_s"])
    assert result["best"]["trial"] == best["trial"] and result["trajectory"][-1]["best_tokens_per_s"] == \
        best["measured_tokens_per_s"]
    running = [p["best_tokens_per_s"] or 0 for p in result["trajectory"]]
    assert running == sorted(running)
    assert result["best"]["run_command"].startswith("harness run system=") and "launcher.nproc=" in \
        result["best"]["run_command"]
    assert (out / "trajectory.png").stat().st_size > 0
    assert "parameter importance" in proc.stdout and "best: trial" in proc.stdout


def test_search_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    bad = harness(["search", "model=gpt-tiny", "search.method=deephyper", "train.global_batch_size=8"], cwd=tmp_path)
    assert bad.returncode == 2 and "search.method=deephyper" in bad.stderr, bad.stderr
    untimed = harness(["search", "model=gpt-tiny", "train.global_batch_size=8"], cwd=tmp_path)  # system=cpu: no peak
    assert untimed.returncode == 2 and "harness calibrate" in untimed.stderr, untimed.stderr
    assert not any(tmp_path.iterdir())
