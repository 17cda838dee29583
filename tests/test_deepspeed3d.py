"""DeepSpeed 3D (megatron-core TP x DeepSpeed pipeline x DP/ZeRO-1): parity, rank layout, sharded build, bad input.

Parity runs train gpt-tiny in fp32 with the same global batch (4 samples) for 4 optimizer steps on
real gloo groups, against the same 1-rank reference as tests/test_parity.py; the issue's tolerance
is 1e-4 absolute per step. Weights are identical because every rank copies its TP/PP slice out of
the seeded full model.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import GLOBAL_BATCH, TINY, Run, assert_losses_match, error_line, harness, harness_run, run_layouts
from test_deepspeed import TOLERANCE

from harness.config.checks import validate
from harness.config.compose import compose
from harness.core.errors import ConfigError

pytestmark = pytest.mark.deepspeed  # DeepSpeed's engine: left out of `make test-fast`

LAYOUTS_3D = {
    "tp2-selective": ["launcher.nproc=2", "parallel.tp=2", "train.micro_batch_size=2",
                      "train.activation_checkpointing=selective"],
    "tp2-sequence-parallel": ["launcher.nproc=2", "parallel.tp=2", "parallel.sequence_parallel=true",
                              "train.micro_batch_size=2"],
    "pp2-checkpointed": ["launcher.nproc=2", "parallel.pp=2", "train.micro_batch_size=1",
                         "train.activation_checkpointing=full"],
    "tp2-pp2": ["launcher.nproc=4", "parallel.tp=2", "parallel.pp=2", "train.micro_batch_size=1"],
    "tp2-dp2": ["launcher.nproc=4", "parallel.tp=2", "train.micro_batch_size=1"],
    "tp2-pp2-sequence-parallel": ["launcher.nproc=4", "parallel.tp=2", "parallel.pp=2",
                                  "parallel.sequence_parallel=true", "train.micro_batch_size=1"],
}


@pytest.fixture(scope="module")
def runs_3d(runs_root: Path) -> dict[str, Run]:
    return run_layouts(runs_root, LAYOUTS_3D, "backend=deepspeed3d", timeout=600)


@pytest.mark.multirank
@pytest.mark.parametrize("layout", list(LAYOUTS_3D))
def test_3d_losses_match_single_rank_reference(reference: Run, runs_3d: dict[str, Run], layout: str) -> None:
    assert_losses_match(reference, runs_3d[layout], TOLERANCE, layout)


@pytest.mark.multirank
def test_untied_output_projection_matches_single_rank_reference(runs_root: Path) -> None:
    """The untied head is its own column-parallel layer on the last stage (TP 2 x PP 2 would need 4 more ranks)."""
    untied = [*TINY, *GLOBAL_BATCH, "model.tie_embeddings=false", "train.micro_batch_size=2"]
    expected = harness_run(runs_root / "reference-untied", *untied, "launcher.nproc=1").losses
    got = harness_run(runs_root / "pp2-untied", *untied, "backend=deepspeed3d", "launcher.nproc=2", "parallel.pp=2",
                      timeout=600).losses
    assert len(got) == 4 and got == pytest.approx(expected, abs=TOLERANCE, rel=0), f"{got} vs {expected}"


@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["tp2-pp2", "tp2-dp2"])
def test_megatron_and_deepspeed_agree_rank_by_rank(runs_3d: dict[str, Run], layout: str) -> None:
    """TP fastest, then DP, then PP, in both libraries (each rank also checked that their groups agree)."""
    block = runs_3d[layout].summary["layout"]
    tp, dp, pp = block["tp"], block["dp"], block["pp"]
    table = block["rank_coordinates"]
    assert [row["rank"] for row in table] == list(range(tp * dp * pp))
    for row in table:
        rank = row["rank"]
        expected = [rank % tp, rank // tp % dp, rank // (tp * dp)]
        assert row["megatron"] == row["deepspeed"] == expected, row


@pytest.mark.multirank
def test_3d_summary(runs_3d: dict[str, Run]) -> None:
    summary = runs_3d["tp2-pp2"].summary
    assert summary["status"] == "ok"
    layout = {k: v for k, v in summary["layout"].items() if k not in ("rank_coordinates", "rank_coordinates_order")}
    assert layout == {"world_size": 4, "tp": 2, "pp": 2, "dp": 1, "zero_stage": 1, "micro_batch_size": 1,
                      "global_batch_size": 4, "grad_accum": 4, "cp": 1, "micro_batches_per_step": 4,
                      "sequence_parallel": False, "block_input_shape": [1, 128, 64], "sequence_parallel_params": 0}
    assert summary["model"]["padded_vocab_size"] == 512
    checkpointed = runs_3d["pp2-checkpointed"].summary["metrics"]
    assert checkpointed["hardware_flops_per_step"] > checkpointed["model_flops_per_step"]
    assert (runs_3d["tp2-pp2"].run_dir / "ds_config.json").is_file()


@pytest.mark.multirank
def test_sequence_parallelism_shards_the_sequence(runs_3d: dict[str, Run]) -> None:
    """Rank 0's first block really receives seq_len/tp = 64 of gpt-tiny's 128 positions, and the replicated
    norms and row-parallel biases (2 blocks x 6 + the final norm's 2) have their gradients summed over TP."""
    plain, sharded = (runs_3d[name].summary["layout"] for name in ("tp2-selective", "tp2-sequence-parallel"))
    assert (plain["sequence_parallel"], plain["block_input_shape"], plain["sequence_parallel_params"]) \
        == (False, [2, 128, 64], 0)
    assert (sharded["sequence_parallel"], sharded["block_input_shape"], sharded["sequence_parallel_params"]) \
        == (True, [2, 64, 64], 14)


def test_vocabulary_padded_to_a_multiple_of_tp() -> None:
    from harness.backends.deepspeed3d import padded_vocab_size

    assert padded_vocab_size(50257, 8) == 50264 and padded_vocab_size(51200, 8) == 51200


def test_gpt_175b_stage_built_on_meta_holds_only_its_slice() -> None:
    """One rank of gpt-175b at TP 8 x PP 16 (128 ranks, simulated by PyTorch's fake process group): stage 5, TP rank 3.

    The stage is built from the backend's own layer specs, partitioned the way DeepSpeed's
    `partition_method="type:BlockPipe"` does (`partition_balanced` over the blocks), on the meta
    device: it holds 6 of the 96 blocks, each a 1/8 TP shard, and allocates no memory.
    """
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from harness.backends.deepspeed import import_deepspeed
    from harness.costmodel.flops import param_count

    import_deepspeed(torch.device("cpu"))
    from deepspeed.runtime.utils import partition_balanced
    from megatron.core import parallel_state

    from harness.backends.deepspeed3d import BLOCK_PARTITION, BlockPipe, layer_specs, model_parallel_config
    from harness.models.config import GPTConfig

    cfg = compose(["model=gpt-175b", "backend=deepspeed3d", "parallel.tp=8", "parallel.pp=16"])
    layout = validate(cfg, 128)
    tp_rank, stage = 3, 5
    dist.init_process_group("fake", rank=tp_rank + layout.tp * layout.dp * stage, world_size=128, store=FakeStore())
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=8, pipeline_model_parallel_size=16,
                                                 create_gloo_process_groups=False)
        assert (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()) \
            == (tp_rank, stage)
        model = GPTConfig.from_section(cfg.model)
        specs = layer_specs(model, model_parallel_config(8, 16, on_gpu=False))
        assert BLOCK_PARTITION == "type:BlockPipe"
        parts = partition_balanced(weights=[int(spec.typename is BlockPipe) for spec in specs], num_parts=16)
        with torch.device("meta"):
            layers = torch.nn.ModuleList(spec.build() for spec in specs[parts[stage]:parts[stage + 1]])
        params = list(layers.parameters())
        assert {p.device.type for p in params} == {"meta"}
        assert [layer.prefix for layer in layers] == [f"blocks.{i}." for i in range(30, 36)]
        h = model.d_model
        sharded = 3 * h * h + 3 * h + h * h + 4 * h * h + 4 * h + 4 * h * h  # qkv, proj, fc, proj weights/biases
        replicated = 2 * h + 4 * h  # the two row-parallel biases, two LayerNorms
        assert sum(p.numel() for p in params) == 6 * (sharded // 8 + replicated)
        share = sum(p.numel() for p in params) / (param_count(cfg.model) / 128)
        assert 0.95 < share < 1.05, share
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


BAD_3D = [
    (["parallel.tp=3"], 12, "parallel.tp=3 does not divide model.n_heads=4"),
    (["parallel.tp=2", "parallel.pp=2"], 6, "world size 6 is not divisible by parallel.tp*parallel.pp=4"),
    (["parallel.pp=3"], 3, "parallel.pp=3 is larger than model.n_layers=2"),
    (["parallel.pp=2", "parallel.zero_stage=2"], 2, "DeepSpeed's pipeline engine supports ZeRO-1 only"),
    (["train.precision=bf16", "+backend.ds_config.fp16.enabled=true"], 2, "fp16 and bf16 both requested"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "model.seq_len=127"], 2,
     "parallel.sequence_parallel=true splits model.seq_len=127 over parallel.tp=2 ranks"),
    (["parallel.sequence_parallel=true"], 2, "parallel.sequence_parallel=true needs parallel.tp > 1"),
    (["train.compile=true"], 2, "backend=deepspeed3d builds its pipeline stages itself"),
    (["train.activation_checkpointing=selective", "train.checkpoint_every_n=1"], 2,
     "backend=deepspeed3d builds its pipeline stages itself"),
]


@pytest.mark.parametrize("overrides,world,message", BAD_3D, ids=[b[2] for b in BAD_3D])
def test_bad_3d_config_is_rejected(overrides: list[str], world: int, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose(["backend=deepspeed3d", *overrides]), world)


def test_bad_ffn_width_fails_before_any_process_group(tmp_path: Path) -> None:
    proc = harness(["run", "backend=deepspeed3d", "launcher.nproc=2", "parallel.tp=2", "model.ffn_hidden=255"],
                   cwd=tmp_path, timeout=60)
    line = error_line(proc)
    assert line.startswith("harness: error: parallel.tp=2 does not divide model.ffn_hidden=255"), line
    assert not any(tmp_path.rglob("*.json")), "an invalid config must not leave a run behind"
