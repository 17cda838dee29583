"""A GPT decoder in one file (Megatron / minGPT / nanoGPT style).

The model is deliberately parallelism-free: distributed backends wrap it from
the outside (FSDP by block, tensor parallelism by submodule name), so the
submodule names and the per-group layout of the fused QKV projection below are
a contract, not an implementation detail.

Construction never pays for PyTorch's default initialisation: modules are
built on the meta device and materialised once by `init_weights()`, which
makes `GPT(cfg)` and `meta build -> to_empty -> init_weights` bit-identical for
the same seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")


@dataclass
class GPTConfig:
    """Shape and flavour of a GPT decoder (GPT-2 defaults, Llama-like options)."""

    n_layers: int = 2
    """Number of transformer blocks."""
    d_model: int = 64
    """Residual stream (hidden) width."""
    n_heads: int = 4
    """Number of query heads; head_dim = d_model // n_heads."""
    ffn_hidden: int | None = None
    """MLP inner width; None means 4 * d_model (resolved in __post_init__)."""
    seq_len: int = 128
    """Maximum sequence length (size of the learned position table / RoPE cache)."""
    vocab_size: int = 512
    """Number of token ids."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads (plain MHA)."""
    activation: str = "gelu"
    """MLP nonlinearity: gelu (exact erf, Megatron default), gelu_tanh (GPT-2 gelu_new) or swiglu."""
    norm: str = "layernorm"
    """Normalisation layer: layernorm or rmsnorm."""
    position: str = "learned"
    """Positions: learned (absolute embedding table) or rope (rotary, applied to q and k)."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output projection."""
    bias: bool = True
    """Biases in linears and LayerNorms (GPT-2: True; Llama-like: False)."""
    norm_eps: float = 1e-5
    """Epsilon of every normalisation layer."""
    init_std: float = 0.02
    """Std of the normal initialisation of weights and embeddings."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""

    def __post_init__(self) -> None:
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.d_model
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("n_layers", "d_model", "n_heads", "ffn_hidden", "seq_len", "vocab_size", "n_kv_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; expected one of {NORMS}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; expected one of {POSITIONS}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


def rope_cache(config: GPTConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim), half-split layout as in Llama/Megatron."""
    half = torch.arange(0, config.head_dim, 2, device=device, dtype=torch.float32) / config.head_dim
    inv_freq = 1.0 / (config.rope_theta**half)
    freqs = torch.outer(torch.arange(config.seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, head_dim) by position: x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Causal (grouped-query) self-attention with one fused QKV projection.

    qkv's output features are laid out per KV group, Megatron-style:
    [group 0: q heads..., k, v | group 1: q heads..., k, v | ...]. A column-wise
    split of `qkv` (and row-wise split of `proj`) therefore hands each
    tensor-parallel rank whole groups, and forward infers the number of local
    groups (`-1`) instead of reading it from the config.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.q_per_group = config.n_heads // config.n_kv_heads
        qkv_out = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.qkv = nn.Linear(config.d_model, qkv_out, bias=config.bias)
        self.proj = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        qkv = self.qkv(x)
        B, T, _ = qkv.shape  # not x's: a sequence-parallel qkv gathers the whole sequence from its shards
        qkv = qkv.view(B, T, -1, self.q_per_group + 2, self.head_dim)
        q, k, v = qkv.split([self.q_per_group, 1, 1], dim=3)
        # Query head g*q_per_group + j belongs to KV group g, which is what enable_gqa expects.
        q = q.reshape(B, T, -1, self.head_dim).transpose(1, 2)
        k = k.squeeze(3).transpose(1, 2)
        v = v.squeeze(3).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.q_per_group > 1)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """Feed-forward block: proj(act(fc(x))), or proj(silu(gate(x)) * fc(x)) for SwiGLU."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.activation = config.activation
        self.fc = nn.Linear(config.d_model, config.ffn_hidden, bias=config.bias)
        if config.activation == "swiglu":
            self.gate = nn.Linear(config.d_model, config.ffn_hidden, bias=config.bias)
        self.proj = nn.Linear(config.ffn_hidden, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.activation == "swiglu":
            h = F.silu(self.gate(x)) * h
        elif self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.gelu(h)
        return self.proj(h)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Decoder-only language model: embeddings -> blocks -> final norm -> lm_head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        device = torch.get_default_device()
        # Build on meta so no time or RNG state goes into PyTorch's default init,
        # which init_weights() would overwrite anyway.
        with torch.device("meta"):
            self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
            if config.position == "learned":
                self.pos_emb = nn.Embedding(config.seq_len, config.d_model)
            else:
                # Non-persistent: derived from the config, recomputed by init_weights().
                rope_shape = (config.seq_len, config.head_dim)
                self.register_buffer("rope_cos", torch.empty(rope_shape), persistent=False)
                self.register_buffer("rope_sin", torch.empty(rope_shape), persistent=False)
            self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
            self.norm_f = make_norm(config)
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._tie_weights()
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights()

    def _tie_weights(self) -> None:
        # Module.to_empty() replaces plain Parameters one module at a time and so unties them.
        if self.config.tie_embeddings and self.lm_head.weight is not self.tok_emb.weight:
            self.lm_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2/Megatron init: N(0, std) weights, residual projections scaled by 1/sqrt(2*n_layers).

        Re-ties embeddings and recomputes the RoPE cache, so it is the one call
        needed after `to_empty()` on a meta-built model. Modules are visited in
        registration order, so the result depends only on the RNG seed.
        """
        self._tie_weights()
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Linear):
                if module is self.lm_head and self.config.tie_embeddings:
                    continue  # same Parameter as tok_emb.weight, already initialised
                is_residual_out = name.endswith(("attn.proj", "mlp.proj"))
                nn.init.normal_(module.weight, mean=0.0, std=resid_std if is_residual_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        if self.config.position == "rope":
            cos, sin = rope_cache(self.config, self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) or, given targets, the mean cross-entropy over all B*T positions."""
        _, T = tokens.shape
        if T > self.config.seq_len:
            raise ValueError(f"sequence length {T} exceeds config.seq_len {self.config.seq_len}")
        x = self.tok_emb(tokens)
        rope = None
        if self.config.position == "learned":
            x = x + self.pos_emb(torch.arange(T, device=tokens.device))
        else:
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        for block in self.blocks:
            x = block(x, rope)
        logits = self.lm_head(self.norm_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Exact parameter count; tied weights count once (parameters() deduplicates)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if self.config.position == "learned":
                n -= self.pos_emb.weight.numel()
        return n
