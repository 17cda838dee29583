"""`harness report` over real run directories: two studies' CPU miniatures end to end, the scaling
formulas recomputed from the summaries, failed and killed runs kept as rows, and one-line errors.
"""

from __future__ import annotations

import csv
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import burning, harness
from tests.test_telemetry import set_energy, zone

SYSTEM = ["system.peak_tflops=0.02", "system.peak_tflops_source=stated for this test",
          "system.intra_node_bw_gb_per_s=2", "system.devices_per_node=4"]
"""A stated CPU profile, so the cost model times the runs and the prediction view has both columns."""


def sweep(tmp: Path, name: str, *args: str, timeout: float = 600) -> Path:
    out = tmp / name
    proc = harness(["run", "-m", f"hydra.sweep.dir={out}", *args], cwd=tmp, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def report(*args: str, cwd: Path) -> Any:
    proc = harness(["report", *args], cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def split(summary: dict[str, Any]) -> tuple[float, float]:
    """(compute s, communication s) of one step from the run's prediction."""
    estimate = summary["prediction"]["estimate"]
    comm = min(sum(estimate["breakdown_s"]["comm"][d] for d in ("dp", "tp", "pp")), estimate["step_time_s"])
    return estimate["step_time_s"] - comm, comm


def summaries(root: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("summary.json"))]


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory, fsdp_study: Path) -> dict[str, Path]:
    """Study 002's batch × checkpointing sweep (shared with the FSDP tests) and study 003's device-count sweep."""
    tmp = tmp_path_factory.mktemp("studies")
    return {
        "002": fsdp_study,
        "003": sweep(tmp, "scaling", "+experiment=characterize-cpu", "parallel.zero_stage=1", *SYSTEM),
    }


def test_sweep_study_writes_report_whose_numbers_are_the_summaries(studies: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = report(str(studies["002"]), "--out", str(out), "--format", "json", cwd=tmp_path)
    tables = json.loads(proc.stdout)
    assert "sweep" in tables
    runs = {(s["config"]["train"]["micro_batch_size"], s["config"]["train"]["activation_checkpointing"]): s
            for s in summaries(studies["002"])}
    assert len(tables["sweep"]) == len(runs) == 4
    for row in tables["sweep"]:
        summary = runs[(row["train.micro_batch_size"], row["train.activation_checkpointing"])]
        assert row["status"] == summary["status"] == "ok"
        assert row["tokens/s"] == pytest.approx(summary["metrics"]["tokens_per_s"], rel=1e-9)
        assert row["ms/step"] == pytest.approx(summary["metrics"]["iter_time_ms"], rel=1e-9)
        assert row["peak MB"] == pytest.approx(summary["metrics"]["peak_memory_mb"], rel=1e-9)
    report_md = (out / "report.md").read_text()
    assert "![Sweep over train.micro_batch_size](sweep.png)" in report_md and "Reproduces:" in report_md
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and "metrics.tokens_per_s" in rows[0] and "train.micro_batch_size" in rows[0]


def test_scaling_view_speedup_and_efficiency_recomputed_from_summaries(studies: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    proc = report(str(studies["003"]), "--view", "scaling,prediction,projection", "--format", "json", cwd=tmp_path)
    tables = json.loads(proc.stdout)
    by_world = {s["layout"]["world_size"]: s for s in summaries(studies["003"])}
    assert sorted(by_world) == [1, 2, 4]
    base = by_world[1]["metrics"]["tokens_per_s"]
    rows = {r["devices"]: r for r in tables["scaling"]}
    for n, summary in by_world.items():
        speedup = summary["metrics"]["tokens_per_s"] / base
        assert rows[n]["speed-up"] == pytest.approx(speedup, rel=1e-9)
        assert rows[n]["efficiency"] == pytest.approx(speedup / n, rel=1e-9)
        predicted = summary["prediction"]["tokens_per_s"] / by_world[1]["prediction"]["tokens_per_s"]
        assert rows[n]["predicted speed-up"] == pytest.approx(predicted, rel=1e-9)
        assert rows[n]["split from"] == "cost model" and rows[n]["comm base"] == 2
    # Cheng et al.'s analysis from the cost model's split, based at 2 ranks (1 rank does not communicate).
    comp_c, comm_c = split(by_world[2])
    assert rows[1]["comm eff g_c→n"] is None and comm_c > 0
    for n in (2, 4):
        comp_n, comm_n = split(by_world[n])
        r_comp, r_comm = comp_c / (comp_c + comm_c), comm_c / (comp_c + comm_c)
        eff = comm_c / comm_n
        batch = by_world[n]["layout"]["global_batch_size"] / by_world[2]["layout"]["global_batch_size"]
        implied = (r_comp + r_comm) / (comp_n / comp_c * r_comp + r_comm / eff) * batch \
            * by_world[2]["metrics"]["tokens_per_s"] / base
        assert rows[n]["comm eff g_c→n"] == pytest.approx(eff, rel=1e-9)
        assert rows[n]["speed-up from split"] == pytest.approx(implied, rel=1e-9)
    measured = {(r["run"], r["metric"]): r for r in tables["prediction"]}
    assert len({run for run, _ in measured}) == 3
    for (run, metric), row in measured.items():
        if row["measured"] is not None and row["predicted"] is not None:
            assert row["error"] == pytest.approx((row["predicted"] - row["measured"]) / row["measured"])
    for row in tables["projection"]:
        if row["from"] == "measured":
            summary = by_world[row["devices"]]
            params = summary["model"]["params"]
            seconds = 6 * params * 20 * params / (summary["metrics"]["model_tflops_per_device"] * 1e12 * row["devices"])
            assert row["days"] == pytest.approx(seconds / 86400, rel=1e-9)


def test_a_slow_baseline_gives_a_superlinear_point_that_report_flags(studies: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    """The 1-rank point rerun 60 ms slower per step (train.fault_inject_slow_ms): the 2- and 4-rank points then
    scale beyond the ideal, which the scaling view flags with its likely cause, beside 95% error bars."""
    mixed = tmp_path / "slow-baseline"
    shutil.copytree(studies["003"], mixed)
    base = next(p.parent for p in mixed.rglob("summary.json") if json.loads(p.read_text())["layout"]["world_size"] == 1)
    shutil.rmtree(base)
    proc = harness(["run", f"hydra.run.dir={base}", "+experiment=characterize-cpu", "parallel.zero_stage=1",
                    "train.fault_inject_slow_ms=60", *SYSTEM], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "report"
    proc = report(str(mixed), "--view", "scaling", "--out", str(out), "--format", "json", cwd=tmp_path)
    rows = {r["devices"]: r for r in json.loads(proc.stdout)["scaling"]}
    assert rows[2]["efficiency"] > 1.05 and isinstance(rows[2]["suspect"], str), rows
    assert rows[1]["suspect"] is None and rows[1]["speed-up ±"] == 0.0
    assert rows[2]["speed-up ±"] > 0 and rows[2]["n"] == rows[4]["n"] == 3, rows
    text = (out / "report.md").read_text()
    assert "(beyond the ideal speed-up), suspect:" in text and " ± " in text
    assert (out / "scaling.png").stat().st_size > 1000


def test_a_busy_host_is_named_in_the_report(tmp_path: Path) -> None:
    with burning(2):
        run = harness(["run", f"hydra.run.dir={tmp_path / 'busy'}", "model=gpt-tiny", "train.steps=4",
                       "telemetry.idle_s=0"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "was busy" in run.stdout + run.stderr  # the run's own table says so, under it
    text = report(str(tmp_path / "busy"), "--view", "sweep", "--format", "md", cwd=tmp_path).stdout
    assert "busy: warning: host" in text and "was busy" in text


def test_failed_and_killed_runs_are_rows_never_dropped(studies: dict[str, Path], tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    shutil.copytree(studies["002"], mixed)
    killed = sorted(p.parent for p in mixed.rglob("summary.json"))[0]
    (killed / "summary.json").unlink()
    oom = harness(["run", f"hydra.run.dir={mixed / 'oom'}", "model=gpt-tiny", "train.steps=2",
                   "train.fault_inject_oom_step=1", "telemetry.idle_s=0"], cwd=tmp_path)
    assert oom.returncode == 1
    tables = json.loads(report(str(mixed), "--view", "sweep", "--format", "json", cwd=tmp_path).stdout)
    statuses = sorted(row["status"] for row in tables["sweep"])
    assert statuses == ["incomplete", "ok", "ok", "ok", "oom"]


def test_power_view_draws_a_fake_rapl_trace(tmp_path: Path) -> None:
    """RAPL is a powercap tree in a temporary directory (this host has none) whose package counter a
    thread advances at 40 W, as the kernel's would."""
    root = zone(tmp_path / "powercap" / "intel-rapl:0", "package-0", 0)
    done = threading.Event()

    def advance() -> None:
        start = time.monotonic()
        while not done.wait(0.02):
            set_energy(root, int((time.monotonic() - start) * 40e6))

    writer = threading.Thread(target=advance, daemon=True)
    writer.start()
    try:
        run_dir = tmp_path / "run"
        proc = harness(["run", f"hydra.run.dir={run_dir}", "model=gpt-tiny", "train.steps=4", "telemetry.source=rapl",
                        f"telemetry.powercap_root={root.parent}", "telemetry.idle_s=0.3"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        done.set()
        writer.join()
    summary = json.loads((run_dir / "summary.json").read_text())
    out = tmp_path / "report"
    tables = json.loads(report(str(run_dir), "--view", "power", "--out", str(out), "--format", "json",
                               cwd=tmp_path).stdout)
    # The value itself is the telemetry tests' subject (a thread's counter lags under load); here: shown as measured.
    assert summary["metrics"]["power_w"] > 0
    assert tables["power"][0]["power W"] == pytest.approx(summary["metrics"]["power_w"])
    assert (out / "power.png").stat().st_size > 1000


@pytest.mark.parametrize("args, field", [
    (["/nonexistent/runs"], "matches no file"),
    (["{empty}"], "no run directory"),
    (["{runs}", "--vs", "train.bogus"], "--vs=train.bogus"),
    (["{runs}", "--view", "bogus"], "--view=bogus"),
    (["{runs}", "--baseline", "fsdp"], "--baseline=fsdp"),
    (["{runs}", "--devices", "0"], "--devices=0"),
    (["{runs}", "--devices", "abc"], "--devices"),
    (["{runs}", "--format", "xml"], "--format"),
    (["{runs}", "--out", "{file}"], "--out="),
    (["{runs}", "--view", "scaling"], "scaling view needs"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], field: str, studies: dict[str, Path],
                                          tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    args = [a.format(empty=tmp_path / "empty", runs=studies["002"], file=tmp_path / "file") for a in args]
    proc = harness(["report", *args], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and lines[0].startswith("harness: error: report:"), proc.stderr
