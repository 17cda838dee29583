"""Shared helpers: tests drive the real `harness` CLI in subprocesses, as a user would."""

from __future__ import annotations

import contextlib
import inspect
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from omegaconf import OmegaConf

from harness.config.compose import CONF_DIR
from harness.config.schema import Config

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_RANK", "PMI_RANK",
               "SUBMITIT_LOCAL_GLOBALID")

MULTIRANK_FIXTURES = {"layout_runs", "fsdp_study", "calibrated_cpu"}
"""Session fixtures that start process groups of 2 or more ranks."""
MANY_RANKS = re.compile(r"(?:launcher\.nproc|tasks|--nproc-per-node|-n)[= ]([2-9])\b|launch_local\(\s*[2-9]")
"""A test that starts 2 or more ranks says so in its source or parameters: `launcher.nproc=2`, `tasks=4`..."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `multirank` every test that starts a process group of 2 or more ranks, by its fixtures, source and
    parameters, so that `make test-fast` leaves it out without anyone remembering to mark it."""
    for item in items:
        function = getattr(item, "function", None)
        source = inspect.getsource(function) if function is not None else ""
        params = str(getattr(getattr(item, "callspec", None), "params", ""))
        if MULTIRANK_FIXTURES & set(getattr(item, "fixturenames", ())) or MANY_RANKS.search(source + params):
            item.add_marker(pytest.mark.multirank)


# Tiny and fast: 2 layers, width 64, 1 thread per rank (see the README's test notes).
TINY = ["model=gpt-tiny", "launcher.omp_num_threads=1", "train.warmup_steps=1", "train.steps=3"]


@dataclass
class Run:
    proc: subprocess.CompletedProcess[str]
    run_dir: Path

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "summary.json").read_text())

    @property
    def steps(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.run_dir / "steps.jsonl").read_text().splitlines()]

    @property
    def losses(self) -> list[float]:
        return [s["loss"] for s in self.steps]


def fsdp_config(*dotlist: str) -> Config:
    """gpt-tiny with backend=fsdp and `dotlist` overrides, as Hydra would compose it (for `validate`)."""
    groups = {"model": OmegaConf.load(CONF_DIR / "model/gpt-tiny.yaml"),
              "backend": OmegaConf.load(CONF_DIR / "backend/fsdp.yaml")}
    return OmegaConf.merge(OmegaConf.structured(Config), groups, OmegaConf.from_dotlist(list(dotlist)))  # type: ignore


def clean_env() -> dict[str, str]:
    """This environment without any launcher's variables, so the CLI starts its own ranks."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return env


def harness(args: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env or clean_env())


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused command prints: exit status 2 and nothing else on stderr (fails the test otherwise)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    return lines[0]


def harness_run(run_dir: Path, *overrides: str, timeout: float = 300) -> Run:
    """`harness run` into a known directory; fails the test with the output if it exits non-zero."""
    proc = harness(["run", f"hydra.run.dir={run_dir}", *overrides], cwd=run_dir.parent, timeout=timeout)
    assert proc.returncode == 0, f"harness run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return Run(proc, run_dir)


def run_layouts(root: Path, layouts: dict[str, list[str]], *common: str, prefix: str = "",
                timeout: float = 300) -> dict[str, Run]:
    """One tiny run per named layout, each into `root/<prefix><name>`."""
    return {name: harness_run(root / f"{prefix}{name}", *TINY, *GLOBAL_BATCH, *common, *overrides, timeout=timeout)
            for name, overrides in layouts.items()}


def assert_losses_match(expected: Run, got: Run, tolerance: float, label: str) -> None:
    """Per-step losses of a parallel layout against its 1-rank reference."""
    want, have = expected.losses, got.losses
    assert len(have) == len(want) == 4
    assert have == pytest.approx(want, abs=tolerance, rel=0), f"{label}: {have} vs {want}"
    # The losses move, so agreement is not the trivial agreement of an untrained model at ln(vocab).
    assert abs(want[-1] - want[0]) > 10 * tolerance


@pytest.fixture(scope="session", autouse=True)
def user_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Profiles `harness calibrate` writes go to a directory of this session, never the user's own."""
    path = tmp_path_factory.mktemp("harness-config")
    os.environ["HARNESS_CONFIG_DIR"] = str(path)
    # Runs on system=cpu would each measure the host first (harness/predict/auto.py): tests that do not test
    # that predict with nothing, as before; tests/test_auto_calibrate.py turns it back on.
    os.environ["HARNESS_AUTO_CALIBRATE"] = "0"
    return path


CALIBRATED = "cpu-test-calibrated"


@pytest.fixture(scope="session")
def calibrated_cpu(user_config_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`harness calibrate` on 2 gloo ranks, once per session: the profile `system=cpu-test-calibrated`
    (what the calibrate test checks and the search test predicts with)."""
    proc = harness(["calibrate", "launcher.nproc=2", "launcher.omp_num_threads=1", f"--name={CALIBRATED}"],
                   cwd=tmp_path_factory.mktemp("calibrate"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return user_config_dir / "system" / f"{CALIBRATED}.yaml"


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def fsdp_study(runs_root: Path) -> Path:
    """The FSDP study's CPU miniature swept once (4 points, 2 ranks each), read by the FSDP and report tests."""
    sweep = runs_root / "fsdp-study-cpu"
    proc = harness(["run", "-m", "+experiment=fsdp-study-cpu", f"hydra.sweep.dir={sweep}"], cwd=runs_root, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sweep


GLOBAL_BATCH = ["train.global_batch_size=4", "train.precision=fp32"]

LAYOUTS = {
    "ddp-2": ["launcher.nproc=2", "backend=ddp", "train.micro_batch_size=2"],
    "ddp-2-accum": ["launcher.nproc=2", "backend=ddp", "train.micro_batch_size=1"],
    # context parallelism (ulysses): two ranks share each sequence; then two replicas of such a pair
    "ddp-cp2": ["launcher.nproc=2", "backend=ddp", "parallel.cp=2", "train.micro_batch_size=2"],
    "fsdp-dp2-cp2-selective": ["launcher.nproc=4", "backend=fsdp", "parallel.cp=2", "train.micro_batch_size=1",
                               "train.activation_checkpointing=selective"],
    "fsdp-tp2-cp2": ["launcher.nproc=4", "backend=fsdp", "parallel.tp=2", "parallel.cp=2", "train.micro_batch_size=2"],
    "fsdp-2": ["launcher.nproc=2", "backend=fsdp", "train.micro_batch_size=2"],
    "fsdp-2-no-reshard": ["launcher.nproc=2", "backend=fsdp", "backend.sharding=shard_grad_op",
                          "train.micro_batch_size=2"],
    "ddp-2-selective": ["launcher.nproc=2", "backend=ddp", "train.micro_batch_size=2",
                        "train.activation_checkpointing=selective"],
    "fsdp-2-attention-checkpointed": ["launcher.nproc=2", "backend=fsdp", "train.micro_batch_size=1",
                                      "train.activation_checkpointing=attention"],
    # torch's fused AdamW kernel over FSDP2's DTensor shards (train.optimizer).
    "fsdp-2-fused-adamw": ["launcher.nproc=2", "backend=fsdp", "train.micro_batch_size=2",
                           "train.optimizer=adamw_fused"],
}


@pytest.fixture(scope="session")
def reference(runs_root: Path) -> Run:
    """One rank, the whole global batch as two accumulated micro-batches."""
    return harness_run(runs_root / "reference", *TINY, *GLOBAL_BATCH, "launcher.nproc=1",
                       "train.micro_batch_size=2")


@pytest.fixture(scope="session")
def layout_runs(runs_root: Path) -> dict[str, Run]:
    return run_layouts(runs_root, LAYOUTS)


def _burn(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


@contextlib.contextmanager
def burning(per_core: int = 1) -> Iterator[None]:
    """`per_core` busy loops per core of this process's CPU set for the duration: a deliberately loaded host."""
    burners = [multiprocessing.Process(target=_burn, args=(600.0,))
               for _ in range(per_core * len(os.sched_getaffinity(0)))]
    for p in burners:
        p.start()
    try:
        yield
    finally:
        for p in burners:
            p.terminate()
            p.join()
