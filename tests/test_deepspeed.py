"""DeepSpeed ZeRO 0-3: parity with the 1-rank reference, the generated JSON, and bad input.

Every run trains gpt-tiny in fp32 with the same global batch (4 samples) for 4 optimizer steps on
real gloo process groups, exactly like tests/test_parity.py; the issue's tolerance is 1e-4
absolute per step (losses are about 6.2 and move by more than 100 times that).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Run, assert_losses_match, error_line, harness, run_layouts

from harness.config.checks import validate
from harness.config.compose import compose
from harness.core.errors import ConfigError

pytestmark = pytest.mark.deepspeed  # DeepSpeed's engine: left out of `make test-fast`

TOLERANCE = 1e-4

ZERO_LAYOUTS = {
    "zero1-accum": ["parallel.zero_stage=1", "train.micro_batch_size=1"],
    "zero2": ["parallel.zero_stage=2", "train.micro_batch_size=2"],
    "zero3-checkpointed": ["parallel.zero_stage=3", "train.micro_batch_size=1", "train.activation_checkpointing=full"],
}


@pytest.fixture(scope="module")
def zero_runs(runs_root: Path) -> dict[str, Run]:
    return run_layouts(runs_root, ZERO_LAYOUTS, "backend=deepspeed", "launcher.nproc=2", timeout=600)


@pytest.mark.multirank
@pytest.mark.parametrize("layout", list(ZERO_LAYOUTS))
def test_zero_losses_match_single_rank_reference(reference: Run, zero_runs: dict[str, Run], layout: str) -> None:
    assert_losses_match(reference, zero_runs[layout], TOLERANCE, layout)


@pytest.mark.multirank
def test_zero_run_directory(zero_runs: dict[str, Run]) -> None:
    run = zero_runs["zero3-checkpointed"]
    summary = run.summary
    assert summary["status"] == "ok"
    assert summary["layout"]["zero_stage"] == 3 and summary["layout"]["dp"] == 2
    assert summary["metrics"]["skipped_steps"] == 0 and all(s["skipped_steps"] == 0 for s in run.steps)
    # Full checkpointing recomputes every block's forward: hardware FLOPs exceed model FLOPs.
    assert summary["metrics"]["hardware_flops_per_step"] > summary["metrics"]["model_flops_per_step"]
    config = json.loads((run.run_dir / "ds_config.json").read_text())
    assert config["zero_optimization"]["stage"] == 3
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (4, 1, 2)
    assert config["optimizer"]["params"]["torch_adam"] is True


def test_generated_config_merges_extra_keys_and_fp16_loss_scaling() -> None:
    from harness.backends.deepspeed import ds_config

    cfg = compose(["backend=deepspeed", "system=cuda", "parallel.zero_stage=2", "train.precision=fp16",
                   "backend.offload_optimizer=true", "+backend.ds_config.zero_optimization.overlap_comm=true",
                   "backend.initial_scale_power=12"])
    config = ds_config(cfg, validate(cfg, 2))
    assert config["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}, "overlap_comm": True}
    fp16 = config["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0 and fp16["initial_scale_power"] == 12
    assert "bf16" not in config


BAD_DEEPSPEED = [
    (["train.precision=fp16", "+backend.ds_config.bf16.enabled=true"], "fp16 and bf16 both requested"),
    (["+backend.ds_config.fp16.enabled=true", "+backend.ds_config.bf16.enabled=true"], "fp16 and bf16 both requested"),
    (["+backend.ds_config.bf16.enabled=true"], "set train.precision=bf16"),
    (["backend.offload_param=true", "parallel.zero_stage=2"],
     "backend.offload_param=true needs parallel.zero_stage>=3"),
    (["backend.offload_optimizer=true"], "backend.offload_optimizer=true needs parallel.zero_stage>=1"),
    (["+backend.ds_config.train_batch_size=8"], "train.global_batch_size"),
    (["train.precision=fp16"], "DeepSpeed's CPU accelerator has no fp16"),
]


@pytest.mark.parametrize("overrides,message", BAD_DEEPSPEED, ids=[b[1] for b in BAD_DEEPSPEED])
def test_bad_deepspeed_config_is_rejected(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(compose(["backend=deepspeed", *overrides]), 2)


def test_bad_input_fails_before_any_process_group(tmp_path: Path) -> None:
    proc = harness(["run", "backend=deepspeed", "launcher.nproc=2", "train.precision=bf16",
                    "+backend.ds_config.fp16.enabled=true"], cwd=tmp_path, timeout=60)
    line = error_line(proc)
    assert line.startswith("harness: error: fp16 and bf16 both requested"), line
    assert not any(tmp_path.rglob("*.json")), "an invalid config must not leave a run behind"
