"""Per-rank timing and stragglers: with one rank slowed on purpose (train.fault_inject_slow_ms, a testing knob that
sleeps inside that rank's steps), the traced steps show the others waiting for it in their collectives, and the
summary, the run's table and `report --view ranks` name it — whichever rank it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import clean_env, harness

from harness.trace.analyse import STRAGGLER_LAG, straggler


@pytest.mark.parametrize("slow", [0, 1])
def test_a_slowed_rank_is_named_as_the_straggler(slow: int, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = harness(["run", f"hydra.run.dir={run_dir}", "model=gpt-tiny", "launcher.nproc=2",
                    "launcher.omp_num_threads=1", "train.steps=6", "profile.enabled=true",
                    "train.fault_inject_slow_ms=40", f"train.fault_inject_slow_rank={slow}", "telemetry.idle_s=0"],
                   cwd=tmp_path, env={**clean_env(), "HARNESS_AUTO_CALIBRATE": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    lagging = summary["breakdown"]["straggler"]
    assert lagging["rank"] == slow and lagging["flagged"], lagging
    assert lagging["lag_ms"] > 10  # a good part of the 40 ms the slowed rank sleeps, spent by the other waiting
    assert any(w.startswith(f"straggler: rank {slow}") for w in summary["warnings"])
    assert f"straggler: rank {slow}" in proc.stdout + proc.stderr
    for step in lagging["per_step"]:  # every traced step: the spread of the ranks' waits, the straggler's the least
        assert step["ranks"] == 2 and step["comm_ms_max"] - step["comm_ms_min"] > 10, step
    table = json.loads(harness(["report", str(run_dir), "--view", "ranks", "--format", "json", "--out",
                                str(tmp_path / "report")], cwd=tmp_path).stdout)["ranks"]
    assert [r["rank"] for r in table if r["straggler"] == "yes"] == [slow]
    assert (tmp_path / "report" / "ranks.png").stat().st_size > 1000  # bars and the rank-by-step heat map


def test_ranks_that_wait_alike_have_no_straggler() -> None:
    rows = [{"rank": r, "step_ms": 100.0, "comm_ms": w} for r, w in enumerate([30.0, 31.0, 29.5, 30.5])]
    quiet = straggler(rows)
    assert quiet is not None and quiet["rank"] == 2 and not quiet["flagged"]
    rows[3]["comm_ms"] = 30.0 - 100 * STRAGGLER_LAG - 1  # the others now wait > 5% of the step for rank 3
    assert straggler(rows)["rank"] == 3 and straggler(rows)["flagged"]  # type: ignore[index]
    assert straggler(rows[:1]) is None
