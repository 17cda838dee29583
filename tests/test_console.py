"""Unix manners and a quiet console: a reader that closes the pipe early ends nothing badly, `--json` is one
JSON document on stdout with everything else on stderr, progress lines reach the terminal and the run's own
harness.log, and third-party chatter stays off the terminal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import TINY, clean_env, harness


def test_a_reader_that_stops_after_one_line_leaves_a_finished_run(tmp_path: Path) -> None:
    """`harness run ... | head -1`: the run goes on to its summary and exits 0, with no traceback."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", f"hydra.run.dir={run_dir}", *TINY,
                             "train.steps=6"], cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after its line
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert first.strip() and "Traceback" not in err and "BrokenPipe" not in err, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["metrics"]["timed_steps"] == 6


def test_json_is_the_only_thing_on_stdout_even_when_the_model_does_not_fit(tmp_path: Path) -> None:
    proc = harness(["estimate", "model=gpt-175b", "system=dgx-a100-80gb", "parallel.world_size=8", "--json"],
                   cwd=tmp_path)
    assert proc.returncode == 1
    estimate = json.loads(proc.stdout)  # one document, nothing after it
    assert estimate["fits"] is False
    assert proc.stderr.startswith("harness: error: fits: false"), proc.stderr


def test_progress_goes_to_the_terminal_and_the_runs_log_and_third_parties_stay_quiet(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = harness(["run", f"hydra.run.dir={run_dir}", *TINY], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stderr.splitlines() if line.strip()]
    assert any("rank(s) started" in line for line in said) and any("built in" in line for line in said)
    assert all(line.startswith("harness: ") for line in said), said  # no INFO, USDT or FutureWarning lines
    log = (run_dir / "harness.log").read_text()
    assert "rank(s) started" in log and "built in" in log and "ok: completed; summary.json written" in log
    verbose = harness(["run", f"hydra.run.dir={tmp_path / 'verbose'}", *TINY, "-v"], cwd=tmp_path)
    assert verbose.returncode == 0 and len(verbose.stderr.splitlines()) >= len(said), verbose.stderr
