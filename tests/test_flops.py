"""FLOP and parameter formulas against measurement: torch's FlopCounterMode and the model itself.

Attention convention: FlopCounterMode counts what runs. Under the math SDPA kernel the causal
mask is applied to a full s×s score matrix, so the counter sees the full QK^T and AV products.
Megatron's model-FLOPs formula counts causal attention once (halved). The test therefore checks
  counter == formula(causal_halved=False)            exactly (GEMMs only: norms, softmax, GELU
                                                      and the optimizer are not counted by either)
  step_flops(...).model == counter - attention_core/2 (the reported convention).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from harness.backends.base import apply_activation_checkpointing
from harness.config.schema import ModelConfig
from harness.costmodel.flops import forward_flops_per_token, param_count, recomputed_forward_per_token, step_flops
from harness.costmodel.peaks import lookup_peak
from harness.models.gpt import GPT, GPTConfig

CONFIGS = {
    "gpt-tiny": GPTConfig(),
    "llama-like": GPTConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, activation="swiglu",
                            norm="rmsnorm", position="rope", tie_embeddings=False, bias=False),
    "~20M": GPTConfig(n_layers=4, d_model=384, n_heads=6, seq_len=256, vocab_size=8192),
}


def counted_training_flops(cfg: GPTConfig, batch: int, checkpointing: str = "none") -> int:
    torch.manual_seed(0)
    model = GPT(cfg)
    apply_activation_checkpointing(model, checkpointing)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens, tokens).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_flops_match_flop_counter(name: str) -> None:
    cfg, batch = CONFIGS[name], 2
    counted = counted_training_flops(cfg, batch)
    tokens = batch * cfg.seq_len
    full = forward_flops_per_token(cfg, causal_halved=False)
    assert 3 * (full.n_layers * full.layer + full.logits) * tokens == pytest.approx(counted, rel=1e-9)
    masked_half = 3 * full.n_layers * full.attn_core / 2 * tokens
    assert step_flops(cfg, batch).model == pytest.approx(counted - masked_half, rel=1e-9)


def test_hardware_flops_add_recompute() -> None:
    cfg = CONFIGS["gpt-tiny"]
    none, selective, attention, full = (step_flops(cfg, 8, mode) for mode in ("none", "selective", "attention", "full"))
    assert none.hardware == none.model
    assert none.model == selective.model == attention.model == full.model
    fwd = forward_flops_per_token(cfg)
    tokens = 8 * cfg.seq_len
    # PyTorch's checkpoint stops before each region's last GEMM (early stop): MLP down projection, ·V
    assert full.hardware - full.model == pytest.approx(cfg.n_layers * (fwd.layer - fwd.mlp_proj) * tokens)
    assert selective.hardware - selective.model == pytest.approx(cfg.n_layers * fwd.attn_core / 2 * tokens)
    megatron = step_flops(cfg, 8, "full", early_stop=False)  # Megatron's checkpoint re-runs whole blocks
    assert megatron.hardware - megatron.model == pytest.approx(cfg.n_layers * fwd.layer * tokens)
    assert none.hardware < selective.hardware < attention.hardware < full.hardware


@pytest.mark.parametrize("early_stop", [True, False], ids=["early-stop", "whole-region"])
@pytest.mark.parametrize("mode", ["selective", "attention", "full"])
def test_recomputed_flops_are_what_the_checkpointed_model_runs_again(mode: str, early_stop: bool) -> None:
    """FlopCounterMode over forward + backward with each granularity applied to the model: what it counts beyond
    the uncheckpointed model is the formula's recompute (selective: Korthikanti et al.'s core attention, a few
    percent; attention: the projections too), with PyTorch's early stop (the default: each region's last GEMM
    is not re-run) and without it (whole regions, as Megatron's checkpoint), counted without the causal
    halving because the math kernel multiplies the masked half as well."""
    cfg, batch = dataclasses.replace(CONFIGS["gpt-tiny"], attention="math"), 2  # plain matmuls, as counted
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        extra = counted_training_flops(cfg, batch, mode) - counted_training_flops(cfg, batch)
    fwd = forward_flops_per_token(cfg, causal_halved=False)
    expected = recomputed_forward_per_token(fwd, mode, early_stop=early_stop)
    assert extra == pytest.approx(expected * batch * cfg.seq_len, rel=1e-9)
    if mode == "selective":  # the point of selective recompute: a small share of the step
        assert extra / counted_training_flops(cfg, batch) < 0.1


def test_megatron_formula_for_a_published_shape() -> None:
    """Narayanan et al. 2021 count 96·B·s·l·h²(1 + s/6h + V/16lh) with full recompute and full attention."""
    cfg = GPTConfig(n_layers=24, d_model=2304, n_heads=24, seq_len=2048, vocab_size=51200)
    b, s, n_layers, h, v = 512, 2048, 24, 2304, 51200
    paper = 96 * b * s * n_layers * h * h * (1 + s / (6 * h) + v / (16 * n_layers * h))
    fwd = forward_flops_per_token(cfg, causal_halved=False)
    ours = (4 * n_layers * fwd.layer + 3 * fwd.logits) * b * s  # forward + backward (2x) + recompute, full attention
    assert ours == pytest.approx(paper, rel=1e-12)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_count_formula_is_exact(name: str) -> None:
    cfg = CONFIGS[name]
    with torch.device("meta"):
        model = GPT(cfg)
    assert param_count(cfg) == model.num_params() == sum(p.numel() for p in model.parameters())


def test_config_schema_mirrors_model_config() -> None:
    schema = {f.name for f in dataclasses.fields(ModelConfig)} - {"name"}
    assert schema == {f.name for f in dataclasses.fields(GPTConfig)}


@pytest.mark.parametrize("device,precision,expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA A100-SXM4-80GB", "fp32", 19.5),
    ("Tesla V100-SXM2-16GB", "fp16", 125.0),
    ("AMD Instinct MI250X", "bf16", 191.5),
    ("NVIDIA H200", "bf16", 989.0),
])
def test_peak_table(device: str, precision: str, expected: float) -> None:
    peak = lookup_peak(device, precision)
    assert peak.tflops == expected and peak.source


@pytest.mark.parametrize("device,precision", [("NVIDIA GeForce RTX 4090", "bf16"), ("Tesla V100-SXM2-16GB", "bf16")])
def test_unknown_peak_is_null_with_a_reason(device: str, precision: str) -> None:
    peak = lookup_peak(device, precision)
    assert peak.tflops is None and peak.reason and precision in peak.reason


def test_a_device_without_the_runs_precision_names_those_it_has_and_the_fix() -> None:
    """V100 has no bf16 tensor-core math; Aurora's tile table holds only its measured bf16 rate: the reason names the
    precisions the table has and the field that sets it, or the measured peak to give instead."""
    v100 = lookup_peak("Tesla V100-SXM2-16GB", "bf16").reason or ""
    assert "set train.precision to one it has (fp16, fp32)" in v100 and "system.peak_tflops" in v100
    tile = lookup_peak("Max 1550", "fp32").reason or ""
    assert "set train.precision to one it has (bf16)" in tile
