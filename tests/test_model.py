"""Tests for models/gpt.py: numerical equivalence with Hugging Face GPT-2 and Llama,
meta-device construction, initialisation, parameter counts, config validation and
the per-group QKV layout that tensor parallelism relies on."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
import torch.nn as nn

from harness.models.config import ModelConfigError
from harness.models.gpt import GPT, GPTConfig

transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------------------- helpers


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Interleave separate q/k/v (weights [out, in] or biases [out]) into our per-group layout:
    [group g: its query heads, its key head, its value head] for g in 0..n_kv_heads-1."""
    q, k, v = (t.reshape(n_kv_heads, -1, *t.shape[1:]) for t in (q, k, v))
    return torch.cat((q, k, v), dim=1).reshape(-1, *q.shape[2:])


@torch.no_grad()
def perturb_(model: nn.Module, scale: float = 0.05) -> None:
    """HF inits biases to 0 and norms to 1; perturb everything so a mis-mapped parameter shows."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * scale)


@torch.no_grad()
def load_hf_gpt2(ours: GPT, hf: nn.Module) -> None:
    """Copy a transformers GPT2LMHeadModel into our GPT (Conv1D weights are [in, out])."""
    t, n_heads = hf.transformer, ours.config.n_heads
    ours.tok_emb.weight.copy_(t.wte.weight)
    ours.pos_emb.weight.copy_(t.wpe.weight)
    for blk, h in zip(ours.blocks, t.h, strict=True):
        blk.norm1.load_state_dict(h.ln_1.state_dict())
        blk.norm2.load_state_dict(h.ln_2.state_dict())
        qkv_w = h.attn.c_attn.weight.t().chunk(3, dim=0)  # c_attn output is [q; k; v]
        qkv_b = h.attn.c_attn.bias.chunk(3, dim=0)
        blk.attn.qkv.weight.copy_(fuse_qkv(*qkv_w, n_kv_heads=n_heads))
        blk.attn.qkv.bias.copy_(fuse_qkv(*qkv_b, n_kv_heads=n_heads))
        blk.attn.proj.weight.copy_(h.attn.c_proj.weight.t())
        blk.attn.proj.bias.copy_(h.attn.c_proj.bias)
        blk.mlp.fc.weight.copy_(h.mlp.c_fc.weight.t())
        blk.mlp.fc.bias.copy_(h.mlp.c_fc.bias)
        blk.mlp.proj.weight.copy_(h.mlp.c_proj.weight.t())
        blk.mlp.proj.bias.copy_(h.mlp.c_proj.bias)
    ours.norm_f.load_state_dict(t.ln_f.state_dict())


@torch.no_grad()
def load_hf_llama(ours: GPT, hf: nn.Module) -> None:
    """Copy a transformers LlamaForCausalLM (separate q/k/v, gate/up/down) into our GPT."""
    m, n_kv = hf.model, ours.config.n_kv_heads
    ours.tok_emb.weight.copy_(m.embed_tokens.weight)
    for blk, layer in zip(ours.blocks, m.layers, strict=True):
        a, mlp = layer.self_attn, layer.mlp
        blk.norm1.weight.copy_(layer.input_layernorm.weight)
        blk.norm2.weight.copy_(layer.post_attention_layernorm.weight)
        blk.attn.qkv.weight.copy_(fuse_qkv(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, n_kv))
        blk.attn.proj.weight.copy_(a.o_proj.weight)
        blk.mlp.gate.weight.copy_(mlp.gate_proj.weight)
        blk.mlp.fc.weight.copy_(mlp.up_proj.weight)
        blk.mlp.proj.weight.copy_(mlp.down_proj.weight)
    ours.norm_f.weight.copy_(m.norm.weight)
    ours.lm_head.weight.copy_(hf.lm_head.weight)


def llama_like(**overrides) -> GPTConfig:
    kw = dict(
        n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, seq_len=32, vocab_size=128,
        activation="swiglu", norm="rmsnorm", position="rope", tie_embeddings=False, bias=False,
    )
    return GPTConfig(**(kw | overrides))


# ----------------------------------------------------------------------------- equivalence


def test_matches_hf_gpt2() -> None:
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=128, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, activation_function="gelu_new", bos_token_id=0, eos_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    perturb_(hf)
    ours = GPT(GPTConfig(
        n_layers=2, d_model=64, n_heads=4, seq_len=32, vocab_size=128, activation="gelu_tanh",
        norm="layernorm", position="learned", tie_embeddings=True, bias=True,
    )).eval()
    load_hf_gpt2(ours, hf)
    assert ours.lm_head.weight is ours.tok_emb.weight

    tokens = torch.randint(0, 128, (3, 32))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
        loss = ours(tokens, tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(got.flatten(0, 1), tokens.flatten()))


def test_matches_hf_llama_gqa_rope_swiglu() -> None:
    """Covers the GQA per-group layout, RoPE (rotate_half), SwiGLU and RMSNorm numerically."""
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    perturb_(hf)
    ours = GPT(llama_like()).eval()
    load_hf_llama(ours, hf)

    tokens = torch.randint(0, 128, (2, 20))  # shorter than seq_len: exercises the RoPE cache slice
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- construction


def test_trillion_parameter_model_on_meta() -> None:
    cfg = GPTConfig(n_layers=128, d_model=25600, n_heads=160, seq_len=2048, vocab_size=51200)
    start = time.perf_counter()
    with torch.device("meta"):
        model = GPT(cfg)
    assert time.perf_counter() - start < 5.0
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())

    d, L, V, T, f = 25600, 128, 51200, 2048, 4 * 25600
    embeddings = V * d + T * d  # tied lm_head adds nothing
    per_layer = (
        (d * 3 * d + 3 * d)  # attn.qkv
        + (d * d + d)  # attn.proj
        + (d * f + f)  # mlp.fc
        + (f * d + d)  # mlp.proj
        + 2 * (2 * d)  # norm1, norm2 (weight + bias)
    )
    expected = embeddings + L * per_layer + 2 * d  # + norm_f
    assert model.num_params() == expected
    assert model.num_params(exclude_embeddings=True) == expected - embeddings
    assert 1.0e12 < expected < 1.02e12


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_meta_init_matches_direct_init(position: str) -> None:
    cfg = GPTConfig(position=position)
    torch.manual_seed(1234)
    direct = GPT(cfg)

    with torch.device("meta"):
        lazy = GPT(cfg)
    lazy.to_empty(device="cpu")
    torch.manual_seed(1234)
    lazy.init_weights()

    assert lazy.lm_head.weight is lazy.tok_emb.weight, "init_weights must re-tie after to_empty"
    direct_state = dict(direct.named_parameters()) | dict(direct.named_buffers())
    lazy_state = dict(lazy.named_parameters()) | dict(lazy.named_buffers())
    assert direct_state.keys() == lazy_state.keys()
    for name, tensor in direct_state.items():
        torch.testing.assert_close(lazy_state[name], tensor, atol=0, rtol=0, msg=name)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    torch.testing.assert_close(lazy(tokens), direct(tokens), atol=0, rtol=0)


def test_init_statistics() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(n_layers=4, d_model=256, n_heads=4)
    model = GPT(cfg)
    resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    blk = model.blocks[0]
    assert blk.attn.qkv.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert blk.attn.proj.weight.std().item() == pytest.approx(resid_std, rel=0.05)
    assert blk.mlp.proj.weight.std().item() == pytest.approx(resid_std, rel=0.05)
    assert torch.all(blk.attn.qkv.bias == 0) and torch.all(blk.norm1.weight == 1)


def test_submodule_names_and_shapes() -> None:
    """Backends address these by name (TP plans, FSDP wrapping)."""
    cfg = llama_like()
    model = GPT(cfg)
    assert not hasattr(model, "pos_emb")
    assert "rope_cos" not in model.state_dict(), "RoPE cache must be a non-persistent buffer"
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    assert attn.qkv.weight.shape == ((4 + 2 * 2) * 16, 64)
    assert attn.proj.weight.shape == (64, 4 * 16)
    assert mlp.fc.weight.shape == mlp.gate.weight.shape == (96, 64)
    assert mlp.proj.weight.shape == (64, 96)
    assert isinstance(model.norm_f, nn.RMSNorm) and model.lm_head.bias is None

    gpt2 = GPT(GPTConfig())
    assert isinstance(gpt2.pos_emb, nn.Embedding) and not hasattr(gpt2.blocks[0].mlp, "gate")
    assert gpt2.config.ffn_width == 4 * gpt2.config.d_model and gpt2.config.kv_heads == 4
    assert gpt2.config.head_dim == 16


# ----------------------------------------------------------------------------- training path


def test_llama_like_config_trains() -> None:
    torch.manual_seed(0)
    cfg = llama_like()
    model = GPT(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len))
    loss = model(tokens, tokens)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(math.log(cfg.vocab_size), abs=0.1)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(exclude_embeddings=True) == model.num_params() - cfg.vocab_size * cfg.d_model


def test_sequence_longer_than_seq_len_is_rejected() -> None:
    model = GPT(GPTConfig(seq_len=8))
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


# ----------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(d_model=65, n_heads=4), "not divisible by n_heads"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads=3 does not divide n_heads"),
        (dict(activation="relu"), "activation"),
        (dict(norm="batchnorm"), "norm"),
        (dict(position="alibi"), "position"),
        (dict(d_model=12, n_heads=4, position="rope"), "even head_dim"),
        (dict(n_layers=0), "n_layers"),
    ],
)
def test_invalid_config_raises(kwargs: dict, match: str) -> None:
    """The model refuses a shape it cannot have, naming the field (the harness's checks say the same)."""
    with pytest.raises(ModelConfigError, match=match) as info:
        GPT(GPTConfig(**kwargs))
    assert info.value.field in match or info.value.field in kwargs


# ----------------------------------------------------------------------------- tensor-parallel layout


def test_qkv_column_shards_hold_whole_kv_groups() -> None:
    """Split attn.qkv row-wise (column parallel) and attn.proj column-wise (row parallel) into
    two ranks of whole KV groups; each shard must reproduce its heads exactly, and the shard
    outputs must sum to the full output. Runs with RoPE and GQA (2 query heads per group)."""
    torch.manual_seed(0)
    cfg = GPTConfig(d_model=32, n_heads=4, n_kv_heads=2, position="rope", seq_len=16)
    model = GPT(cfg).eval()
    attn = model.blocks[0].attn
    rope = (model.rope_cos, model.rope_sin)
    x = torch.randn(2, cfg.seq_len, cfg.d_model)

    def run(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Output of the module and the per-head attention output that feeds proj."""
        seen = []
        handle = module.proj.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
        out = module(x, rope)
        handle.remove()
        return out, seen[0]

    tp = 2
    hd = cfg.head_dim
    group_rows = (cfg.n_heads // cfg.n_kv_heads + 2) * hd
    rows_per_rank = cfg.n_kv_heads // tp * group_rows
    heads_per_rank = cfg.n_heads // tp
    with torch.no_grad():
        full_out, full_heads = run(attn)
        partial_sum = torch.zeros_like(full_out)
        for rank in range(tp):
            shard = copy.deepcopy(attn)
            rows = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)
            cols = slice(rank * heads_per_rank * hd, (rank + 1) * heads_per_rank * hd)
            shard.qkv = nn.Linear(cfg.d_model, rows_per_rank)
            shard.qkv.weight.copy_(attn.qkv.weight[rows])
            shard.qkv.bias.copy_(attn.qkv.bias[rows])
            shard.proj = nn.Linear(heads_per_rank * hd, cfg.d_model, bias=False)  # bias added once
            shard.proj.weight.copy_(attn.proj.weight[:, cols])
            out, heads = run(shard)
            torch.testing.assert_close(heads, full_heads[..., cols], atol=1e-6, rtol=0)
            partial_sum += out
    torch.testing.assert_close(partial_sum + attn.proj.bias, full_out, atol=1e-6, rtol=0)
