"""Checkpoint time and goodput in the cost model (harness/costmodel/resilience.py): Daly's optimum is an optimum,
goodput falls with more nodes and a slower file system, the checkpoint is the state the backend holds, the nodes'
injection bandwidth caps a fast file system, and a system without file-system figures says so."""

from __future__ import annotations

import json
import math

import pytest
from conftest import harness

from harness.config.checks import validate
from harness.config.compose import compose
from harness.costmodel.estimate import estimate
from harness.costmodel.resilience import daly_interval_s, goodput

LARGE = ["model=gpt-13b", "system=frontier", "backend=deepspeed3d", "parallel.tp=4", "parallel.pp=4",
         "train.global_batch_size=512", "train.precision=bf16"]


def est(*overrides: str, world: int = 256) -> dict:  # type: ignore[type-arg]
    cfg = compose([*LARGE, *overrides])
    return estimate(cfg, validate(cfg, world))


def test_dalys_interval_is_the_optimum_and_starts_from_youngs() -> None:
    delta, mtbf, restart = 60.0, 36_000.0, 600.0
    best = daly_interval_s(delta, mtbf)
    assert abs(best - math.sqrt(2 * delta * mtbf)) < 0.05 * best  # Young's first-order term dominates
    around = [goodput(best * f, delta, restart, mtbf) for f in (0.5, 0.8, 1.0, 1.25, 2.0)]
    assert max(around) == pytest.approx(around[2], rel=1e-3) and around[2] < 1
    assert daly_interval_s(3 * mtbf, mtbf) == mtbf  # a checkpoint longer than 2 MTBF: Daly's τ = M


def test_goodput_falls_with_more_nodes_and_a_slower_file_system() -> None:
    small, large = est(world=256)["checkpoint"], est(world=2048)["checkpoint"]
    assert large["job_mtbf_hours"] == pytest.approx(small["job_mtbf_hours"] * small["nodes"] / large["nodes"])
    assert large["goodput_at_optimal"] < small["goodput_at_optimal"] < 1
    slow = est("system.fs_write_bw_gb_per_s=50", "system.fs_read_bw_gb_per_s=50")["checkpoint"]
    assert slow["write_s"] > small["write_s"] and slow["goodput_at_optimal"] < small["goodput_at_optimal"]
    every = est("costmodel.checkpoint_every_steps=1")["checkpoint"]
    assert every["interval_steps"] == 1 and every["goodput"] < small["goodput"]


def test_the_checkpoint_is_the_state_the_backend_holds() -> None:
    deepspeed = est()["checkpoint"]
    params = est()["params"]
    assert deepspeed["bytes"] == pytest.approx(params * 14)  # bf16 weights + fp32 master, Adam's m and v
    fsdp = compose(["model=gpt-13b", "system=frontier", "backend=fsdp", "train.global_batch_size=512",
                    "train.precision=bf16"])
    assert estimate(fsdp, validate(fsdp, 256))["checkpoint"]["bytes"] == pytest.approx(params * 12)  # fp32 + Adam


def test_the_nodes_injection_caps_a_fast_file_system() -> None:
    ckpt = est("system.fs_write_bw_gb_per_s=1e9", world=16)["checkpoint"]
    cfg = compose(LARGE)
    injection = 2 * cfg.system.nics_per_node * cfg.system.nic_bw_gb_per_s * cfg.system.nic_efficiency  # 2 nodes
    assert ckpt["limited_by"] == "node injection" and ckpt["write_bw_gb_per_s"] == pytest.approx(injection)


def test_a_system_without_file_system_figures_says_so(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ckpt = est("system.fs_write_bw_gb_per_s=null")["checkpoint"]
    assert "fs_write_bw_gb_per_s" in ckpt["reason"] and ckpt["bytes"] > 0
    shown = harness(["estimate", *LARGE, "parallel.world_size=256"], cwd=tmp_path)
    assert shown.returncode == 0 and "goodput" in shown.stdout, shown.stderr
    plan = harness(["plan", *[o for o in LARGE if not o.startswith("parallel.")], "parallel.world_size=256",
                    "--top=2", "--json"], cwd=tmp_path)
    rows = json.loads(plan.stdout)["best"]
    assert all(0 < r["goodput"] < 1 for r in rows), rows
