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

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig, block_linears

__all__ = ["GPT", "GPTConfig"]

APEX_NORMS = ("FusedLayerNorm", "FusedRMSNorm")
"""apex's norms (model.norm_impl=apex), re-initialised like torch's; matched by name so apex is never imported
unless chosen."""


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm_impl == "apex":  # NVIDIA apex's fused CUDA kernels (the run's preflight checked it is there)
        from apex.normalization import FusedLayerNorm, FusedRMSNorm

        if config.norm == "rmsnorm":
            return FusedRMSNorm(config.d_model, eps=config.norm_eps)
        if not config.bias:
            raise ValueError("model.norm_impl=apex: apex's FusedLayerNorm always has a bias; use model.bias=true "
                             "or model.norm_impl=torch")
        return FusedLayerNorm(config.d_model, eps=config.norm_eps)
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


def linear(config: GPTConfig, name: str) -> nn.Linear:
    """The block linear `name` with the shape the model description (config.block_linears) gives it."""
    spec = next(layer for layer in block_linears(config) if layer.name == name)
    return nn.Linear(spec.n_in, spec.n_out, bias=config.bias)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax(QKᵀ/√d)V written out, (B, heads, T, head_dim); K and V repeated for grouped queries."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    T = q.shape[2]
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """flash-attn's kernel, which takes (B, T, heads, head_dim) and handles grouped queries itself."""
    from flash_attn import flash_attn_func

    y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    return y.transpose(1, 2)


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


class CoreAttention(nn.Module):
    """softmax(QKᵀ/√d)·V of (B, heads, T, head_dim) tensors, by the kernel `model.attention` names.

    A module of its own (no parameters), as Megatron's `CoreAttention`: it is what selective activation
    recomputation (Korthikanti et al. 2022, section 5) re-runs in the backward pass instead of storing its
    large intermediates, while the projections around it keep their activations.
    """

    def __init__(self, kernel: str, grouped: bool) -> None:
        super().__init__()
        self.kernel, self.grouped = kernel, grouped

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.kernel == "math":
            return math_attention(q, k, v)
        if self.kernel == "flash_attn":
            return flash_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.grouped)


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
        self.q_per_group = config.n_heads // config.kv_heads
        self.qkv = linear(config, "attn.qkv")
        self.proj = linear(config, "attn.proj")
        self.core = CoreAttention(config.attention, grouped=self.q_per_group > 1)

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
        y = self.core(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """Feed-forward block: proj(act(fc(x))), or proj(silu(gate(x)) * fc(x)) for SwiGLU."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.activation = config.activation
        self.fc = linear(config, "mlp.fc")
        if config.activation == "swiglu":
            self.gate = linear(config, "mlp.gate")
        self.proj = linear(config, "mlp.proj")

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
        config.check()
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
        if self.tok_emb is None or self.lm_head is None:
            return  # a pipeline stage holding one end only (see forward)
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
        residual = tuple(layer.name for layer in block_linears(self.config) if layer.residual)
        for name, module in self.named_modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Linear):
                if module is self.lm_head and self.config.tie_embeddings:
                    continue  # same Parameter as tok_emb.weight, already initialised
                nn.init.normal_(module.weight, mean=0.0, std=resid_std if name.endswith(residual) else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or module.__class__.__name__ in APEX_NORMS:
                module.reset_parameters()
        if self.config.position == "rope":
            cos, sin = rope_cache(self.config, self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) or, given targets, the mean cross-entropy over all B*T positions.

        A pipeline stage is this model with the parts other stages hold set to None (torchtitan's way):
        without `tok_emb` it takes the previous stage's hidden states (B, T, d_model) instead of tokens,
        and without `lm_head` it returns its hidden states. `positions` (T,) are the tokens' places in their
        sequence when they are a chunk of it (context parallelism hands each rank one); default 0..T-1.
        """
        T = tokens.shape[1]
        if T > self.config.seq_len:
            raise ValueError(f"sequence length {T} exceeds config.seq_len {self.config.seq_len}")
        x = tokens if self.tok_emb is None else self.tok_emb(tokens)
        rope = None
        if self.config.position == "rope":
            rope = ((self.rope_cos[:T], self.rope_sin[:T]) if positions is None
                    else (self.rope_cos[positions], self.rope_sin[positions]))
        elif self.tok_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=tokens.device) if positions is None else positions)
        for block in self.blocks:
            x = block(x, rope)
        if self.lm_head is None:
            return x
        logits = self.lm_head(self.norm_f(x))
        return logits if targets is None else self.loss(logits, targets)

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all positions, in fp32 whatever the logits' dtype."""
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Exact parameter count; tied weights count once (parameters() deduplicates)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if self.config.position == "learned":
                n -= self.pos_emb.weight.numel()
        return n
