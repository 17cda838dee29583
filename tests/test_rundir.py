"""The run directory is a contract (DESIGN.md): check every file and key a 2-rank run leaves."""

from __future__ import annotations

import pytest
from conftest import Run
from omegaconf import OmegaConf

from harness.config.schema import ModelConfig
from harness.costmodel.flops import param_count, step_flops

STEP_KEYS = {"step", "warmup", "loss", "iter_time_ms", "tokens_per_s", "model_tflops_per_device",
             "hardware_tflops_per_device", "mfu", "hfu", "peak_memory_mb", "power_w", "energy_j"}
SUMMARY_KEYS = {"schema", "status", "error", "config", "env", "layout", "model", "metrics", "prediction", "telemetry"}
METRIC_KEYS = {"iter_time_ms", "tokens_per_s", "model_tflops_per_device", "hardware_tflops_per_device", "mfu", "hfu",
               "peak_memory_mb", "power_w", "energy_j_per_step", "tokens_per_joule"}


def test_config_yaml_is_the_resolved_config(layout_runs: dict[str, Run]) -> None:
    run = layout_runs["ddp-2"]
    config = OmegaConf.to_container(OmegaConf.load(run.run_dir / "config.yaml"))
    assert config == run.summary["config"]
    assert config["name"] == "gpt-tiny-ddp"  # interpolations resolved


def test_steps_jsonl_has_a_line_per_step(layout_runs: dict[str, Run]) -> None:
    steps = layout_runs["ddp-2"].steps
    assert [s["step"] for s in steps] == [0, 1, 2, 3]
    assert [s["warmup"] for s in steps] == [True, False, False, False]
    for s in steps:
        assert STEP_KEYS <= s.keys()
        assert s["iter_time_ms"] > 0 and s["tokens_per_s"] > 0 and s["model_tflops_per_device"] > 0
        assert s["power_w"] is None and s["energy_j"] is None  # no power source on this machine


def test_summary(layout_runs: dict[str, Run]) -> None:
    run = layout_runs["ddp-2"]
    summary = run.summary
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["schema"] == "harness.run/1" and summary["status"] == "ok" and summary["error"] is None
    metrics = summary["metrics"]
    assert METRIC_KEYS <= metrics.keys()
    assert metrics["iter_time_ms"] > 0 and metrics["tokens_per_s"] > 0 and metrics["model_tflops_per_device"] > 0
    assert metrics["timed_steps"] == 3
    timed = sorted(s["iter_time_ms"] for s in run.steps if not s["warmup"])
    assert metrics["iter_time_ms"] == timed[1]  # the median of the timed steps, warm-up excluded
    # Throughput follows from the iteration time and the FLOP formula, per device.
    cfg = ModelConfig(**{k: v for k, v in summary["config"]["model"].items()})
    flops = step_flops(cfg, 4).model
    assert metrics["model_flops_per_step"] == flops
    # steps.jsonl holds milliseconds, the summary divides by the step's seconds: the same value up to the last bit
    median_rate = sorted(4 * 128 / (s["iter_time_ms"] / 1e3) for s in run.steps[1:])[1]
    assert metrics["tokens_per_s"] == pytest.approx(median_rate, rel=1e-12, abs=0)
    # Not measured means null with a reason, never a guess.
    assert metrics["mfu"] is None and "peak" in metrics["mfu_reason"]
    assert metrics["power_w"] is None and metrics["power_w_reason"]
    assert summary["telemetry"]["source"] is None and summary["telemetry"]["reason"]
    # The cost model predicts the same keys; on the uncalibrated cpu profile it has no peak, so no time.
    prediction = summary["prediction"]
    assert prediction["peak_memory_mb"] > 0 and prediction["comm_bytes_per_device"] > 0
    assert prediction["iter_time_ms"] is None and "calibrate" in prediction["iter_time_ms_reason"]
    assert metrics["peak_memory_kind"] == "cpu_peak_rss" and metrics["peak_memory_mb"] > 0
    assert summary["model"]["params"] == param_count(cfg)
    env = summary["env"]
    assert env["world_size"] == 2 and env["torch"] and env["lightning-fabric"] and env["hostnames"]
    # What produced the number: the harness commit, the accelerator stack, the packages, the job.
    for key in ("commit", "dirty", "python", "deepspeed", "megatron-core", "hydra-core", "flash-attn", "apex",
                "HolisticTraceAnalysis", "torch_cuda", "torch_hip", "collectives", "device_name", "devices_per_node",
                "device_memory_gb", "driver", "job"):
        assert key in env, key
    assert env["collectives"] == "gloo" and env["driver"] is None and env["driver_reason"]
    assert (env["commit"] is None) == ("commit_reason" in env)
    kernels = summary["kernels"]
    assert kernels["optimizer"] == "adamw" and kernels["norm_impl"] == "torch"
    assert kernels["attention"]["sdpa_kernel"] in ("FLASH_ATTENTION", "MATH")  # what PyTorch offers a CPU
    assert env["launcher"] == "torchrun"  # the elastic agent's variables
