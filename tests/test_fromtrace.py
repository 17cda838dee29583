"""Predicting from a profile: rates learned from a run's trace, the step by resource with its 2x what-ifs,
`plan --vary`, and the warnings when a prediction reaches outside what was calibrated.

- On HTA's real A100 trace (tests/data/hta): the GEMM kernels are found through their launches, with FLOPs from
  the launching operator's shapes, and the rates learned stay within the device's physical limits.
- On a real 2-rank CPU run profiled here: `harness calibrate --from` writes a profile that predicts that run as
  measured, and a narrower model faster (benchmarks/trace_calibration.py scores seven other runs).
- Each mechanism moves the prediction the way it must, and a test fails if it is removed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import TINY, harness, harness_run

from harness.config.compose import compose
from harness.costmodel.network import NCCL_PROTOCOLS, fabric
from harness.costmodel.reach import reach_warnings
from harness.costmodel.timing import cpu_share
from harness.predict.fromtrace import gemm_flops, op_times
from harness.run.preflight import check_config
from harness.trace.events import load

HTA = Path(__file__).parent / "data" / "hta" / "sampled_rank-0.json.gz"


def test_gemm_flops_come_from_the_recorded_shapes() -> None:
    assert gemm_flops("aten::mm", {"Input Dims": [[8, 16], [16, 32]]}) == 2 * 8 * 16 * 32
    assert gemm_flops("aten::addmm", {"Input Dims": [[32], [8, 16], [16, 32]]}) == 2 * 8 * 16 * 32
    assert gemm_flops("aten::bmm", {"Input Dims": [[4, 8, 16], [4, 16, 32]]}) == 4 * 2 * 8 * 16 * 32
    assert gemm_flops("aten::add", {"Input Dims": [[8], [8]]}) is None
    assert gemm_flops("aten::mm", {}) is None  # no record_shapes: no FLOPs, not a guess


def test_a_real_gpu_traces_gemms_are_found_through_their_launches() -> None:
    from harness.predict.fromtrace import fit_gemm, fit_memory

    ops = op_times(load(HTA))
    gemms = [o for o in ops if o.kind == "gemm"]
    assert len(gemms) > 100 and sum(o.flops > 0 for o in gemms) > 100
    rate, _ = fit_gemm(ops)
    bandwidth, per_op = fit_memory(ops, host=False)
    # An A100 (cutlass_80 TF32 kernels): below its 156 TFLOP/s TF32 peak and its 2 TB/s HBM, and doing real work.
    assert 10e12 < rate < 156e12 and 100e9 < bandwidth < 2.1e12 and per_op == 0.0


def test_fused_attention_is_found_by_its_operator_or_kernel_name_whichever_library_ran_it() -> None:
    """FlashAttention (flash-attn, SDPA's flash backend), memory-efficient attention and cuDNN's (KempnerForge's
    trace on H200: aten::_cudnn_attention_backward; its kernels cudnn_generated_fort_native_sdpa_sm90_flash_*)."""
    from harness.predict.fromtrace import classify

    for name in ("aten::_scaled_dot_product_flash_attention", "aten::_efficient_attention_backward",
                 "aten::_cudnn_attention_forward", "aten::_cudnn_attention_backward",
                 "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0",
                 "void flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t>>"):
        assert classify(name) == "attention", name


# --- mechanisms ---------------------------------------------------------------------------------------------------


def test_cpu_ranks_share_the_hosts_cores() -> None:
    profile = compose(["system=cpu", "system.cores_per_node=2", "system.calibrated_ranks_per_node=2"]).system
    assert cpu_share(profile, 2) == (1.0, 1.0)
    assert cpu_share(profile, 4) == (0.5, 0.5)  # twice the ranks on the same cores: each at half speed
    assert cpu_share(profile, 1) == (2.0, 1.0)  # one rank computes on both cores; its Python on one
    assert cpu_share(compose(["system=cpu"]).system, 4) == (1.0, 1.0)  # a profile that does not say


def test_gloo_reduces_scatter_as_a_whole_all_reduce() -> None:
    cpu = fabric(compose(["system=cpu", "system.intra_node_bw_gb_per_s=1", "system.devices_per_node=4"]).system)
    assert cpu.call_s("reduce_scatter", 1e8, 4, 4) == cpu.call_s("all_reduce", 1e8, 4, 4)
    nccl = dataclasses.replace(cpu, protocols=NCCL_PROTOCOLS)
    assert nccl.call_s("reduce_scatter", 1e8, 4, 4) < nccl.call_s("all_reduce", 1e8, 4, 4)


def test_a_measured_attention_rate_replaces_the_published_one() -> None:
    base = ["model=gpt-1.3b", "system=dgx-h100", "backend=fsdp", "train.precision=bf16", "parallel.world_size=8"]
    published = check_config(compose(base), 8).estimate["time_by_resource_s"]["compute: attention"]
    slow = check_config(compose([*base, "system.attention_tflops=50"]), 8).estimate
    assert slow["time_by_resource_s"]["compute: attention"] > 2 * published


def test_the_step_by_resource_adds_up_and_each_what_if_helps_only_what_binds() -> None:
    one_node = check_config(compose(["model=gpt-6.7b", "system=dgx-h100", "backend=fsdp", "train.precision=bf16",
                                     "parallel.world_size=8", "train.micro_batch_size=2"]), 8).estimate
    parts = one_node["time_by_resource_s"]
    assert sum(parts.values()) == pytest.approx(one_node["step_time_s"], rel=1e-9)
    what_if = one_node["what_if"]
    gemm_share = parts["compute: gemm"] / one_node["step_time_s"]
    assert gemm_share > 0.5 and what_if["2x GEMM rate"]["speedup"] == pytest.approx(1 / (1 - gemm_share / 2),
                                                                                     rel=0.1)
    assert what_if["2x inter-node bandwidth"]["speedup"] == pytest.approx(1.0)  # one node: no network
    # 40 blocks on 6 DeepSpeed stages (7, 7, 7, 7, 6, 6 and the head): the busiest rank's parts, bubble included
    uneven = check_config(compose(["model=gpt-13b", "system=dgx-a100-80gb", "backend=deepspeed3d", "parallel.pp=6",
                                   "train.precision=bf16", "parallel.world_size=6", "train.global_batch_size=192",
                                   "train.activation_checkpointing=full"]), 6).estimate
    parts = uneven["time_by_resource_s"]
    assert sum(parts.values()) == pytest.approx(uneven["step_time_s"], rel=1e-9) and parts["pipeline bubble"] > 0
    slow_net = check_config(compose(["model=gpt-1.3b", "system=polaris", "backend=ddp", "train.precision=bf16",
                                     "parallel.world_size=64", "system.nic_bw_gb_per_s=1"]), 64).estimate
    assert slow_net["what_if"]["2x inter-node bandwidth"]["speedup"] > 1.3  # all-reduce across nodes binds


def test_plan_varies_a_hardware_parameter_and_a_faster_network_never_slows_the_best_layout(tmp_path: Path) -> None:
    proc = harness(["plan", "model=gpt-1.3b", "system=polaris", "parallel.world_size=32",
                    "train.global_batch_size=64", "--vary=system.nic_bw_gb_per_s=0.5,5,50", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    assert [r["value"] for r in rows] == ["0.5", "5", "50"]
    times = [r["step_time_s"] for r in rows]
    assert times[0] > times[1] >= times[2]


def test_estimate_warns_when_a_calibrated_profile_is_asked_far_outside_what_it_saw() -> None:
    cfg = compose(["system=cpu", "+system.calibrated_on.d_model=256", "+system.calibrated_on.world_size=2",
                   "model.d_model=4096", "model.n_heads=32"])
    warnings = reach_warnings(cfg, 8)
    assert len(warnings) == 2 and "16x" in warnings[0] and "8 ranks" in warnings[1]
    assert reach_warnings(compose(["system=cpu", "+system.calibrated_on.d_model=256", "model.d_model=512"]), 1) == []
    assert reach_warnings(compose(["system=dgx-h100"]), 1024) == []  # published rates: nothing calibrated


# --- end to end on this CPU ---------------------------------------------------------------------------------------

SOURCE = [*TINY, "launcher.nproc=2", "model.d_model=128", "model.n_layers=2", "train.micro_batch_size=2",
          "train.steps=12", "profile.enabled=true"]


@pytest.mark.multirank  # a 2-rank run, timed to 2%: not beside another test's ranks (make test runs this tier alone)
def test_calibrate_from_a_profiled_run_predicts_it_and_scales(tmp_path: Path, user_config_dir: Path) -> None:
    run = harness_run(tmp_path / "source", *SOURCE)
    assert run.proc.returncode == 0, run.proc.stderr
    proc = harness(["calibrate", f"--from={run.run_dir}", "--name=from-trace-test"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    profile = user_config_dir / "system" / "from-trace-test.yaml"
    assert profile.is_file() and "learned GEMM" in proc.stdout
    try:
        model = [o for o in SOURCE if o.startswith(("model", "train.micro", "launcher.nproc"))]
        est = check_config(compose(["system=from-trace-test", *model]), 2).estimate
        measured = run.summary["metrics"]["iter_time_ms"]
        assert est["iter_time_ms"] == pytest.approx(measured, rel=0.02)  # the source, as measured
        assert est["reach_warnings"] == []
        narrow = check_config(compose(["system=from-trace-test", *model, "model.d_model=64"]), 2).estimate
        assert narrow["iter_time_ms"] < est["iter_time_ms"]
        wide = check_config(compose(["system=from-trace-test", *model, "model.d_model=1024"]), 2).estimate
        assert wide["reach_warnings"] and "d_model=1024" in wide["reach_warnings"][0]
    finally:
        profile.unlink()


def test_calibrate_from_a_directory_without_a_trace_says_how_to_make_one(tmp_path: Path) -> None:
    run = harness_run(tmp_path / "plain", *TINY)
    proc = harness(["calibrate", f"--from={run.run_dir}"], tmp_path)
    assert proc.returncode == 2 and "profile.enabled=true" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_scaling_every_learned_rate_scales_the_modelled_step_alike() -> None:
    """Where the rates learned from a profiled step explain more than the unprofiled step took, calibrate speeds
    every rate up by the same factor: that reproduces the source only if each modelled time scales with it."""
    from omegaconf import OmegaConf

    from harness.config.checks import validate
    from harness.predict.fromtrace import _modelled_step_s, _scale_rates

    cfg = compose([*TINY, "launcher.nproc=2", "backend=fsdp", "parallel.tp=2", "system.auto_calibrate=false"])
    layout = validate(cfg, 2)
    profile = {**OmegaConf.to_container(cfg.system, resolve=True), "peak_tflops": 0.05, "gemm_efficiency": 1.0,
               "gemm_half_gflop": 0.01, "hbm_bw_gb_per_s": 20.0, "memory_efficiency": 1.0, "kernel_launch_us": 30.0,
               "intra_node_bw_gb_per_s": 2.0, "comm_latency_us": 500.0, "intra_node_efficiency": 1.0,
               "layer_overhead_us": 0.0, "step_overhead_us": 0.0, "devices_per_node": 2,
               "intra_hop_latency_us": 0.0, "inter_hop_latency_us": 0.0}  # as calibrate writes them
    before = _modelled_step_s(cfg, layout, profile)
    _scale_rates(profile, 1.25)
    assert _modelled_step_s(cfg, layout, profile) == pytest.approx(before / 1.25, rel=1e-9)
