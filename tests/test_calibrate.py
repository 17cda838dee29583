"""`harness calibrate`'s fits recover the figures its measurements were made from (its probes' own gradient
all-reduce taken out), and its profile composes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import CALIBRATED
from omegaconf import OmegaConf

from harness.config.compose import CONF_DIR, compose
from harness.costmodel.comm import RING_FACTOR
from harness.costmodel.timing import hardware
from harness.models.gpt import GPT
from harness.predict.calibrate import (
    GEMM_SIZES,
    PROBE_LAYERS,
    PROBE_WIDTHS,
    _probe_config,
    modelled_probe_block_s,
    profile_from,
)
from harness.run.preflight import check_config


def synthetic_measurements() -> dict:  # type: ignore[type-arg]
    rate, half = 5e10, 1e6  # 0.05 TFLOP/s, half efficiency at 1 MFLOP
    result = {"world": 2, "device": "cpu", "mem_bw": 1e10,
              "gemm": [(2.0 * n**3, (2.0 * n**3 + half) / rate) for n in GEMM_SIZES],
              "comm": {kind: [(RING_FACTOR[kind](2) * size, 1e-4 + RING_FACTOR[kind](2) * size / 1e9)
                              for size in (2**16, 2**20)] for kind in ("all_reduce", "all_gather")}}
    for width in PROBE_WIDTHS:
        for layers in PROBE_LAYERS:
            # Two DDP ranks: each probe step also all-reduces its fp32 gradients once (2(1-1/2)·4 bytes each).
            all_reduce = 1e-4 + 4 * _probe_params(width, layers) / 1e9
            result[f"gpt_{width}_{layers}"] = 0.002 + layers * (0.001 if width == 16 else 0.02) + all_reduce
    return result


def _probe_params(width: int, layers: int) -> int:
    with torch.device("meta"):
        model = GPT(_probe_config(width, layers))
    return sum(p.numel() for p in model.parameters())


def test_profile_fits_recover_rates() -> None:
    base = OmegaConf.to_container(compose(["system=cpu"]).system)
    profile = profile_from(synthetic_measurements(), base, "cpu-test", "fp32")  # type: ignore[arg-type]
    assert abs(profile["peak_tflops"] - 0.05) < 1e-4
    assert abs(profile["gemm_half_gflop"] - 0.001) < 1e-5
    assert abs(profile["intra_node_bw_gb_per_s"] - 1.0) < 1e-6
    assert abs(profile["comm_latency_us"] - 100) < 1e-3
    assert abs(profile["layer_overhead_us"] - 1000) < 1e-6 and abs(profile["step_overhead_us"] - 2000) < 1e-6
    assert profile["devices_per_node"] == 2
    # The fitted streaming efficiency makes the model's kernels reproduce the measured 20 ms per width-256 block.
    assert modelled_probe_block_s(profile, 256) == pytest.approx(0.02, rel=1e-6)
    assert profile["kernel_startup_us"] == 0.0  # a CPU's operators are host calls


def test_a_gpu_profile_states_the_kernel_startup_its_memory_fit_was_made_with() -> None:
    """On a GPU the streaming efficiency is fitted with each kernel's startup beside it (costmodel/peaks.py), so
    the profile writes down the figure it used: a later change to the shipped one cannot then count twice what
    the fit already holds."""
    base = OmegaConf.to_container(compose(["system=dgx-h100"]).system)
    assert base["kernel_startup_us"] is None  # the shipped profile takes the device's published figure
    profile = profile_from(synthetic_measurements(), base, "h100-test", "bf16")  # type: ignore[arg-type]
    assert profile["kernel_startup_us"] == pytest.approx(2.433)
    assert hardware(SimpleNamespace(**profile), profile["peak_tflops"]).startup_s == pytest.approx(2.433e-6)


def test_written_profile_is_a_system_choice() -> None:
    base = OmegaConf.to_container(compose(["system=cpu"]).system)
    profile = profile_from(synthetic_measurements(), base, "cpu-calibrated-test", "fp32")  # type: ignore[arg-type]
    path = CONF_DIR / "system" / "cpu-calibrated-test.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(profile)))
    try:
        cfg = compose(["system=cpu-calibrated-test", "launcher.nproc=2"])
        est = check_config(cfg, 2).estimate
    finally:
        path.unlink()
    assert est["step_time_s"] > 0 and est["peak_tflops"] == profile["peak_tflops"]


@pytest.mark.multirank
def test_calibrate_two_ranks_writes_a_profile_a_run_can_use(calibrated_cpu: Path, user_config_dir: Path) -> None:
    """The real command on 2 gloo ranks: the measured rates are positive, the profile lands in the user's config
    directory (never the package), and `system=<name>` finds it there."""
    name, path = CALIBRATED, calibrated_cpu
    assert path.parent == user_config_dir / "system" and path.is_file()
    assert not (CONF_DIR / "system" / f"{name}.yaml").exists()
    profile = OmegaConf.to_container(OmegaConf.load(path))
    for key in ("peak_tflops", "hbm_bw_gb_per_s", "intra_node_bw_gb_per_s", "layer_overhead_us"):
        assert profile[key] > 0, key  # type: ignore[index]
    assert profile["comm_latency_us"] >= 0  # type: ignore[index]  # the fit keeps its intercept non-negative
    assert profile["devices_per_node"] == 2 and profile["overlap_comm"] is False  # type: ignore[index]
    est = check_config(compose([f"system={name}", "launcher.nproc=2", "model=gpt-tiny"]), 2).estimate
    assert est["step_time_s"] > 0 and est["comm_bytes_per_device"]["dp"] > 0
