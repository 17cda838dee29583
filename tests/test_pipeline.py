"""The PyTorch-native 3D path (backend=fsdp parallel.pp>1) against a 1-rank reference, and FSDP's fp16.

Every pipeline run trains gpt-tiny (2 blocks) in fp32 with the parity tests' global batch of 4 samples for
4 optimizer steps on real gloo process groups, against the same 1-rank reference; the global gradient norm
each step clips by (over stages, meshes and the tied copies, counted once) must match the reference's too:
AdamW is nearly blind to a uniform gradient scale, so losses alone would not catch a wrong norm.
With pp 2 x vpp 2 the 2 blocks split over 4 stages as [embedding], [block 0], [block 1], [output layer] (megatron-core's
account_for_embedding/loss_in_pipeline_split). gpt-tiny ties its embeddings, so the first and last stage
hold copies of one weight. The tolerance is the data-parallel tests' 1e-5: gradients are summed in a
different order, not differently.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, Run, assert_losses_match, fsdp_config, harness_run, run_layouts
from omegaconf import OmegaConf

from harness.backends.base import materialize
from harness.backends.pipeline import seed_stage, stage_module
from harness.config.checks import validate
from harness.config.compose import CONF_DIR
from harness.core.errors import ConfigError
from harness.core.registry import pipeline_split
from harness.models.gpt import GPT, GPTConfig

TOLERANCE = 1e-5

PIPELINES = {
    "pp2-1f1b": ["launcher.nproc=2", "parallel.pp=2"],
    "pp2-vpp2-interleaved": ["launcher.nproc=2", "parallel.pp=2", "parallel.vpp=2"],  # as the README types it
    "pp2-vpp2-zbv": ["launcher.nproc=2", "parallel.pp=2", "parallel.vpp=2", "backend.pp_schedule=ZBVZeroBubble"],
    "pp2-fsdp2-gpipe": ["launcher.nproc=4", "parallel.pp=2", "backend.pp_schedule=GPipe"],
    # LoopedBFS and InterleavedZeroBubble: benchmarks/pipeline_parity.py (the suite's time on a 2-core host)
    # TP 2 with sequence parallelism on stages of one block and on stages of none (embedding, head)
    "pp2-vpp2-tp2-sp": ["launcher.nproc=4", "parallel.pp=2", "parallel.vpp=2", "parallel.tp=2",
                        "parallel.sequence_parallel=true"],
}



@pytest.fixture(scope="session")
def pipeline_runs(runs_root: Path) -> dict[str, Run]:
    layouts = {name: ["backend=fsdp", "train.micro_batch_size=1", *overrides]
               for name, overrides in PIPELINES.items()}
    return run_layouts(runs_root, layouts, prefix="pipeline-")


@pytest.mark.multirank
@pytest.mark.parametrize("layout", list(PIPELINES))
def test_pipeline_layout_matches_single_rank_reference(reference: Run, pipeline_runs: dict[str, Run],
                                                       layout: str) -> None:
    run = pipeline_runs[layout]
    assert_losses_match(reference, run, TOLERANCE, layout)
    want, have = [s["grad_norm"] for s in reference.steps], [s["grad_norm"] for s in run.steps]
    assert have == pytest.approx(want, rel=1e-5), f"{layout}: gradient norms {have} vs {want}"


def test_stages_built_on_the_meta_device_initialise_differently() -> None:
    """On a GPU each stage initialises only itself; seeded per stage, blocks of the same shape on different
    stages start different (with the run's seed everywhere they would start equal)."""
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layers=4, d_model=64, n_heads=4, seq_len=16, vocab_size=64))
    firsts = []
    for stage, blocks in enumerate(pipeline_split(4, 4)):
        part = stage_module(model, blocks, stage == 0, stage == 3)
        seed_stage(0, stage)
        materialize(part, torch.device("cpu"))
        firsts.append(part.blocks[0].attn.qkv.weight)
    assert not any(torch.equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1:])


def _expected_params() -> tuple[int, int, int, int]:
    """Parameter elements of gpt-tiny's parts: one block, the word embedding, the learned positions (which only
    the first stage holds) and the final norm."""
    cfg = OmegaConf.load(CONF_DIR / "model/gpt-tiny.yaml")
    model = GPT(GPTConfig(**{k: v for k, v in cfg.items() if k != "name"}))
    positions = model.pos_emb.weight.numel() if model.config.position == "learned" else 0
    return (sum(p.numel() for p in model.blocks[0].parameters()), model.tok_emb.weight.numel(), positions,
            sum(p.numel() for p in model.norm_f.parameters()))


@pytest.mark.multirank
def test_each_rank_holds_only_its_stages(pipeline_runs: dict[str, Run]) -> None:
    """1F1B on 2 ranks: block 0 and the embeddings on rank 0; block 1, the final norm and the last stage's copy of
    the tied embedding on rank 1. Interleaved: stages 0 (embeddings) and 2 (block 1) on rank 0; V: stages 0 and 3,
    both ends, on rank 0 and both blocks on rank 1."""
    block, embedding, positions, norm = _expected_params()
    first, last = embedding + positions, norm + embedding
    layout = pipeline_runs["pp2-1f1b"].summary["layout"]
    assert layout["params_per_rank"] == [first + block, block + last]
    assert (layout["pp_schedule"], layout["stages_per_rank"], layout["stages_on_rank0"]) == ("1F1B", 1, [0])
    assert layout["blocks_by_stage"] == [1, 1]
    assert layout["mesh"] == {"pp": 2, "data_parallel": 1, "tensor_parallel": 1}
    assert layout["bubble_fraction"] == pytest.approx((2 - 1) / 4)
    interleaved = pipeline_runs["pp2-vpp2-interleaved"].summary["layout"]
    assert interleaved["stages_on_rank0"] == [0, 2] and interleaved["pp_schedule"] == "Interleaved1F1B"
    assert interleaved["blocks_by_stage"] == [0, 1, 1, 0]
    assert interleaved["params_per_rank"] == [first + block, block + last]
    assert interleaved["bubble_fraction"] == pytest.approx(layout["bubble_fraction"] / 2)
    v = pipeline_runs["pp2-vpp2-zbv"].summary["layout"]
    assert v["stages_on_rank0"] == [0, 3] and v["bubble_fraction"] == 0.0
    assert v["params_per_rank"] == [first + last, 2 * block]
    sharded = pipeline_runs["pp2-fsdp2-gpipe"].summary["layout"]  # FSDP halves each stage's share
    assert sharded["params_per_rank"] == [(first + block) // 2] * 2 + [(block + last) // 2] * 2
    assert sharded["mesh"] == {"pp": 2, "data_parallel": 2, "tensor_parallel": 1}


FP16 = [*(o for o in TINY if not o.startswith("train.steps=")), "train.steps=13", "backend=fsdp",
        "train.precision=fp16", "train.global_batch_size=4", "launcher.nproc=2", "backend.initial_scale_power=28",
        "backend.loss_scale_window=2"]


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["fsdp2", "pp2"])
def test_fp16_scales_the_loss_dynamically_and_skips_overflowing_steps(runs_root: Path, layout: str) -> None:
    """fp16 compute (FSDP2's param_dtype) with ShardedGradScaler. A scale of 2**28 overflows fp16 gradients, so
    the first steps are skipped (the scale halves each time) until it fits; then it doubles after every 2 clean
    steps (backend.loss_scale_window=2) until it overflows again. Counted per step and in the summary."""
    overrides = ["train.micro_batch_size=2"] if layout == "fsdp2" else ["parallel.pp=2", "train.micro_batch_size=1"]
    run = harness_run(runs_root / f"fp16-{layout}", *FP16, *overrides)
    steps = run.steps
    skipped = [s["skipped_steps"] for s in steps]
    scales = [s["loss_scale"] for s in steps]
    assert skipped[0] == 1 and scales[0] == 2.0 ** 27
    assert 0 in skipped, f"every step overflowed: {scales}"
    clean = 0
    for before, after, skip in zip(scales, scales[1:], skipped[1:]):
        clean = 0 if skip else clean + 1
        assert after == (before / 2 if skip else before * 2 if clean % 2 == 0 else before), (scales, skipped)
    assert run.summary["metrics"]["skipped_steps"] == sum(skipped)
    assert all(s["loss"] == pytest.approx(6.25, abs=0.1) for s in steps)  # finite, near ln(512)


BAD_PIPELINES = [
    (["parallel.pp=2", "backend.pp_schedule=Zigzag"], 2, "backend.pp_schedule=Zigzag", "Interleaved1F1B"),
    (["model.n_layers=3", "parallel.pp=2", "parallel.vpp=2"], 2, "model.n_layers=3", "product divides 3 (or 5"),
    (["model.n_layers=4", "parallel.pp=2", "backend.pp_schedule=1F1B", "parallel.vpp=2"], 2,
     "backend.pp_schedule=1F1B", "parallel.vpp=1"),
    (["model.n_layers=4", "parallel.pp=2", "backend.pp_schedule=Interleaved1F1B"], 2,
     "backend.pp_schedule=Interleaved1F1B", "parallel.vpp >= 2"),
    (["model.n_layers=6", "parallel.pp=2", "parallel.vpp=3", "backend.pp_schedule=ZBVZeroBubble"], 2,
     "backend.pp_schedule=ZBVZeroBubble", "parallel.vpp=2"),
    (["parallel.pp=2", "train.global_batch_size=1"], 2, "backend.pp_schedule=1F1B", "at least 2 micro-batches"),
    (["model.n_layers=4", "parallel.pp=4", "parallel.vpp=1", "backend.pp_schedule=LoopedBFS"], 4,
     "backend.pp_schedule=LoopedBFS", "parallel.vpp >= 2"),
    (["model.n_layers=8", "parallel.pp=4", "parallel.vpp=2", "train.global_batch_size=9"], 4,
     "backend.pp_schedule=Interleaved1F1B", "multiple"),
    (["parallel.vpp=2"], 2, "parallel.vpp=2", "parallel.pp"),
    (["backend.pp_schedule=GPipe"], 2, "backend.pp_schedule=GPipe", "parallel.pp > 1"),
    (["backend.param_dtype=fp16"], 2, "backend.param_dtype=fp16", "train.precision=fp16"),
    (["model.n_layers=4", "parallel.pp=2", "parallel.vpp=2", "backend.pp_schedule=ZBVZeroBubble", "train.compile=true"],
     2, "train.compile=true", "train.compile=false"),
    (["parallel.pp=2", "backend.offload=true", "system.device=cuda"], 2, "backend.offload=true", "parallel.pp=1"),
    (["train.precision=fp16", "backend.param_dtype=bf16"], 2, "backend.param_dtype=bf16", "drop"),
]


@pytest.mark.parametrize("overrides,world,field,fix", BAD_PIPELINES, ids=[" ".join(b[0]) for b in BAD_PIPELINES])
def test_bad_pipeline_options_are_rejected_in_one_line(overrides: list[str], world: int, field: str, fix: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(fsdp_config("train.micro_batch_size=1", *overrides), world)
    message = str(info.value)
    assert "\n" not in message and field in message and fix in message, message


def test_deepspeed3d_refuses_virtual_stages_and_names_the_backend_that_interleaves() -> None:
    cfg = fsdp_config("backend.name=deepspeed3d", "model.n_layers=4", "parallel.pp=2", "parallel.vpp=2")
    with pytest.raises(ConfigError, match="backend=deepspeed3d has no interleaved pipeline.*use backend=fsdp"):
        validate(cfg, 2)
