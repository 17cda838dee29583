"""`harness calibrate`'s fits recover the figures its measurements were made from, and its profile composes."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from harness.calibrate import GEMM_SIZES, PROBE_LAYERS, PROBE_WIDTHS, modelled_probe_block_s, profile_from
from harness.config import CONF_DIR
from harness.costmodel.comm import RING_FACTOR
from harness.predict import compose, predict


def synthetic_measurements() -> dict:  # type: ignore[type-arg]
    rate, half = 5e10, 1e6  # 0.05 TFLOP/s, half efficiency at 1 MFLOP
    result = {"world": 2, "device": "cpu", "mem_bw": 1e10,
              "gemm": [(2.0 * n**3, (2.0 * n**3 + half) / rate) for n in GEMM_SIZES],
              "comm": {kind: [(RING_FACTOR[kind](2) * size, 1e-4 + RING_FACTOR[kind](2) * size / 1e9)
                              for size in (2**16, 2**20)] for kind in ("all_reduce", "all_gather")}}
    for width in PROBE_WIDTHS:
        for layers in PROBE_LAYERS:
            result[f"gpt_{width}_{layers}"] = 0.002 + layers * (0.001 if width == 16 else 0.02)
    return result


def test_profile_fits_recover_rates() -> None:
    base = OmegaConf.to_container(compose(["system=cpu"]).system)
    profile = profile_from(synthetic_measurements(), base, "cpu-test", "fp32")  # type: ignore[arg-type]
    assert abs(profile["peak_tflops"] - 0.05) < 1e-4
    assert abs(profile["gemm_half_gflop"] - 0.001) < 1e-5
    assert abs(profile["intra_node_bw_gb_per_s"] - 1.0) < 1e-6
    assert abs(profile["comm_latency_us"] - 100) < 1e-3
    assert abs(profile["layer_overhead_us"] - 1000) < 1e-6 and abs(profile["step_overhead_us"] - 2000) < 1e-6
    assert profile["devices_per_node"] == 2
    # The fitted non-GEMM passes make the model reproduce the measured 20 ms per width-256 block.
    assert modelled_probe_block_s(profile, 256) == pytest.approx(0.02, rel=1e-6)


def test_written_profile_is_a_system_choice() -> None:
    base = OmegaConf.to_container(compose(["system=cpu"]).system)
    profile = profile_from(synthetic_measurements(), base, "cpu-calibrated-test", "fp32")  # type: ignore[arg-type]
    path = CONF_DIR / "system" / "cpu-calibrated-test.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(profile)))
    try:
        cfg = compose(["system=cpu-calibrated-test", "launcher.nproc=2"])
        _, est = predict(cfg, 2)
    finally:
        path.unlink()
    assert est["step_time_s"] > 0 and est["peak_tflops"] == profile["peak_tflops"]
