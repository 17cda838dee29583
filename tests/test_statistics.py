"""Numbers with their noise: spreads and intervals of every per-step figure, rates that agree with the step time,
the host's load beside them, warnings when a figure cannot be trusted, and the CPU host calibrated on first use so
that `make demo` shows its prediction.

The figures come from real runs on this machine; the loaded-host test burns both cores with two other processes.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from conftest import TINY, burning, clean_env, harness, harness_run

from harness.core.stats import describe, inverted, plus_minus, t975


def test_describe_gives_n_median_spread_and_a_t_interval() -> None:
    xs = [10.0, 12.0, 11.0, 13.0, 14.0]
    d = describe(xs)
    assert d["n"] == 5 and d["median"] == 12.0 and d["spread"] == "iqr" and d["q1"] == 11.0 and d["q3"] == 13.0
    half = t975(4) * statistics.stdev(xs) / 5**0.5
    assert d["ci95"] == pytest.approx([12.0 - half, 12.0 + half])
    few = describe([1.0, 3.0])
    assert few["spread"] == "min-max" and few["ci95"] is None and "at least 3" in few["ci_reason"]
    assert plus_minus(few) == 1.0 and describe([]) is None


def test_t_quantiles_follow_the_table_and_approach_the_normal() -> None:
    assert t975(1) == 12.706 and t975(30) == 2.042
    assert 2.0 < t975(60) < 2.01 and abs(t975(10_000) - 1.96) < 1e-3


def test_a_rate_is_the_work_over_the_step_times_figures() -> None:
    times = describe([100.0, 110.0, 90.0, 120.0, 105.0])
    rate = inverted(times, 1000.0)
    assert rate["median"] == pytest.approx(1000.0 / times["median"])
    assert rate["q1"] == pytest.approx(1000.0 / times["q3"]) and rate["max"] == pytest.approx(1000.0 / times["min"])
    assert rate["ci95"][0] == pytest.approx(1000.0 / times["ci95"][1])


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return harness_run(tmp_path_factory.mktemp("stats") / "run", *TINY, "train.steps=6")


def test_a_runs_summary_carries_every_figures_spread_and_agrees_with_itself(quiet_run) -> None:  # type: ignore[no-untyped-def]
    summary = quiet_run.summary
    stats, metrics = summary["statistics"], summary["metrics"]
    assert stats["timed_steps"] == 6 and "warm-up" in stats["rule"]
    assert stats["iter_time_ms"]["n"] == 6 and stats["iter_time_ms"]["ci95"] is not None
    assert metrics["iter_time_ms"] == stats["iter_time_ms"]["median"]
    tokens_per_step = summary["layout"]["global_batch_size"] * summary["model"]["seq_len"]
    # tokens/s and ms/step agree by construction, in the metrics and in their spreads.
    assert metrics["tokens_per_s"] * metrics["iter_time_ms"] / 1e3 == pytest.approx(tokens_per_step, rel=1e-9)
    assert stats["tokens_per_s"]["median"] == pytest.approx(metrics["tokens_per_s"], rel=1e-9)
    during = next(iter(summary["host_load"]["during"].values()))
    assert during["cores"] >= 1 and during["job_cores"] > 0 and summary["host_load"]["before"]["cores"] >= 1
    assert isinstance(summary["warnings"], list)


def test_the_result_table_shows_the_spread_and_the_interval(quiet_run) -> None:  # type: ignore[no-untyped-def]
    out = quiet_run.proc.stdout
    assert "median ± half IQR" in out.replace("\n", " ").replace("│", " ") or "± half" in out
    assert "95% CI of the mean" in out


def test_too_few_timed_steps_are_warned_about(tmp_path: Path) -> None:
    run = harness_run(tmp_path / "few", *TINY, "train.steps=2")
    assert any("too few for a 95% interval" in w for w in run.summary["warnings"])
    assert "harness: warning: 2 timed step(s)" in run.proc.stdout


def test_a_run_on_a_loaded_host_is_flagged(tmp_path: Path) -> None:
    with burning():
        run = harness_run(tmp_path / "busy", *TINY, "train.steps=6")
    host = next(iter(run.summary["host_load"]["during"].values()))
    assert host["other_cores"] > 0.25 * host["cores"], host
    assert any("was busy" in w for w in run.summary["warnings"]), run.summary["warnings"]


def test_the_cpu_host_is_calibrated_once_on_first_use_and_predicts(tmp_path: Path) -> None:
    env = {**clean_env(), "HARNESS_CONFIG_DIR": str(tmp_path / "config")}
    env.pop("HARNESS_AUTO_CALIBRATE", None)
    first = harness(["run", f"hydra.run.dir={tmp_path / 'first'}", *TINY], tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    assert "measuring this CPU host once" in first.stderr
    summary = json.loads((tmp_path / "first" / "summary.json").read_text())
    assert summary["config"]["system"]["name"] == "cpu-auto-n1" and summary["prediction"]["iter_time_ms"] > 0
    assert (tmp_path / "config" / "system" / "cpu-auto-n1.yaml").is_file()
    again = harness(["run", f"hydra.run.dir={tmp_path / 'again'}", *TINY], tmp_path, env=env)
    # Cached, unless the first calibration saw a busy host (a parallel test run): then it measures again.
    assert again.returncode == 0 and ("measuring" not in again.stderr or "cores are busy" in first.stderr)
    off = harness(["run", f"hydra.run.dir={tmp_path / 'off'}", *TINY, "system.auto_calibrate=false"], tmp_path,
                  env=env)
    assert off.returncode == 0
    assert json.loads((tmp_path / "off" / "summary.json").read_text())["prediction"]["iter_time_ms"] is None


def test_live_tensors_built_before_the_timed_loop_count_though_the_collector_is_frozen() -> None:
    """The timed loop freezes the garbage collector (rank.frozen_gc), and gc.get_objects() does not list frozen
    objects: the parameters, built before the loop, must still count in a CPU step's tensor peak."""
    import gc

    import torch

    from harness.run.metrics import live_tensor_bytes
    from harness.run.rank import frozen_gc

    gc.collect()  # cycles earlier tests left would be freed by frozen_gc's own collection, between the two counts
    before = live_tensor_bytes()
    weights = torch.zeros(2**20)  # 4 MiB, built before the loop
    with frozen_gc():
        assert live_tensor_bytes() - before >= weights.nbytes
        assert gc.get_freeze_count() > 0  # and the collector is frozen again afterwards
    del weights


def test_cpu_memory_is_the_tensor_peak_beside_the_prediction(quiet_run) -> None:  # type: ignore[no-untyped-def]
    metrics = quiet_run.summary["metrics"]
    assert metrics["peak_memory_kind"] == "cpu_peak_rss" and metrics["tensor_peak_mb"] > 0
    assert metrics["tensor_peak_mb"] < metrics["peak_memory_mb"]  # tensors are part of the process's memory
