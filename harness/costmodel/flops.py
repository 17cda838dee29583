"""Parameter and FLOP counts of the GPT in `models/gpt.py`, from its dimensions alone.

Model FLOPs follow Megatron-LM's `num_floating_point_operations` (megatron/training/training.py):
GEMMs only, 2·m·n·k per GEMM, training = 3 × forward (forward, weight grad, data grad), GQA and
SwiGLU aware, logits included, causal attention counted once (the masked half of QK^T and AV is
not counted), no recompute. Hardware FLOPs add the forward passes that activation checkpointing
recomputes. MFU uses model FLOPs, HFU hardware FLOPs (Chowdhery et al. 2022, PaLM, appendix B).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from harness.core.registry import CHECKPOINTING
from harness.models.config import GPTConfig, block_linears

ModelDims = Any
"""Anything with the model fields (`harness.models.config.GPTConfig`, the schema's ModelConfig, a DictConfig section);
read through `GPTConfig.from_section`."""


def _dims(m: Any) -> tuple[int, int, int, int, int, int, int]:
    """(layers, hidden, query heads, kv heads, head size, ffn width, vocab)."""
    g = GPTConfig.from_section(m)
    return g.n_layers, g.d_model, g.n_heads, g.kv_heads, g.head_dim, g.ffn_width, g.vocab_size


@dataclass(frozen=True)
class Tensor:
    """One parameter tensor of `harness.models.gpt.GPT`, named as there."""

    name: str
    numel: int
    tp_split: bool
    """Megatron splits it over the TP ranks (column/row-parallel weights, column-parallel biases, the
    vocab-parallel embedding); norms, row-parallel biases and learned positions are replicated."""


def model_key(m: ModelDims) -> tuple[Any, ...]:
    """The model's fields as a hashable key, so that what depends only on the shape is computed once per shape
    (the planner asks for the same model's tensors hundreds of thousands of times)."""
    if type(m) is GPTConfig:  # noqa: E721 (a subclass carries more fields)
        return tuple(vars(m).values())
    g = GPTConfig.from_section(m)
    return tuple(getattr(g, f.name) for f in dataclasses.fields(GPTConfig))


def shape_cached(fn: Any) -> Any:
    """`fn(model, *args)` memoised on the model's fields and the (hashable) other arguments."""
    cached = lru_cache(maxsize=256)(lambda key, *args: fn(GPTConfig(*key), *args))

    @functools.wraps(fn)
    def wrapper(m: ModelDims, *args: Any) -> Any:
        return cached(model_key(m), *args)
    return wrapper


@shape_cached
def param_modules(m: ModelDims) -> tuple[tuple[str, tuple[Tensor, ...]], ...]:
    """`harness.models.gpt.GPT`'s parameter-holding modules in forward order (also their registration order).

    A tied output projection lists the embedding's tensor again: the same Parameter used twice,
    which matters to ZeRO-3's gathering (harness/costmodel/comm.py).
    """
    layers, h, a, g, dh, f, vocab = _dims(m)
    bias = bool(m.bias)

    def linear(name: str, n_in: int, n_out: int, *, column: bool) -> tuple[str, tuple[Tensor, ...]]:
        weight = Tensor(f"{name}.weight", n_in * n_out, True)
        return name, (weight, Tensor(f"{name}.bias", n_out, column)) if bias else (weight,)

    def norm(name: str) -> tuple[str, tuple[Tensor, ...]]:
        with_bias = m.norm == "layernorm" and bias
        return name, (Tensor(f"{name}.weight", h, False),) + ((Tensor(f"{name}.bias", h, False),) if with_bias else ())

    out = [("tok_emb", (Tensor("tok_emb.weight", vocab * h, True),))]
    if m.position == "learned":
        out.append(("pos_emb", (Tensor("pos_emb.weight", m.seq_len * h, False),)))
    linears = block_linears(GPTConfig.from_section(m))
    for i in range(layers):
        p = f"blocks.{i}."
        for spec in linears:
            if spec.name == "attn.qkv":
                out.append(norm(p + "norm1"))
            elif spec.name == "mlp.fc":
                out.append(norm(p + "norm2"))
            out.append(linear(p + spec.name, spec.n_in, spec.n_out, column=spec.split == "column"))
    out.append(norm("norm_f"))
    out.append(("lm_head", out[0][1] if m.tie_embeddings else (Tensor("lm_head.weight", vocab * h, True),)))
    return tuple(out)


@shape_cached
def param_tensors(m: ModelDims) -> tuple[Tensor, ...]:
    """Each parameter tensor once (a tied projection is the embedding's), in registration order."""
    return tuple({t.name: t for _, tensors in param_modules(m) for t in tensors}.values())


def param_count(m: ModelDims) -> int:
    """Exact trainable parameters of `harness.models.gpt.GPT` (tied embeddings counted once)."""
    return sum(t.numel for t in param_tensors(m))


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs per token, split so that recompute policies can pick their parts."""

    attn_gemms: float
    """QKV and output projections of one layer."""
    attn_core: float
    """QK^T and AV of one layer."""
    mlp: float
    """The MLP GEMMs of one layer."""
    logits: float
    """The output projection onto the vocabulary."""
    n_layers: int
    attn_proj: float = 0.0
    """The attention output projection (part of attn_gemms): the last GEMM of the attention sub-layer."""
    mlp_proj: float = 0.0
    """The MLP's down projection (part of mlp): the last GEMM of a block."""

    @property
    def layer(self) -> float:
        return self.attn_gemms + self.attn_core + self.mlp


def forward_flops_per_token(m: ModelDims, *, causal_halved: bool = True) -> ForwardFlops:
    """Forward GEMM FLOPs per token. `causal_halved=False` counts the full attention matrix."""
    layers, h, a, g, dh, f, vocab = _dims(m)
    s = m.seq_len
    q = a * dh
    core = 2 * 2 * s * q  # QK^T and AV, each 2·s·q per token
    return ForwardFlops(
        attn_gemms=2 * h * (a + 2 * g) * dh + 2 * q * h,
        attn_core=core / 2 if causal_halved else core,
        mlp=2 * h * f * (3 if m.activation == "swiglu" else 2),
        logits=2 * h * vocab,
        n_layers=layers,
        attn_proj=2 * q * h,
        mlp_proj=2 * h * f,
    )


def recomputed_forward_per_token(fwd: ForwardFlops, activation_checkpointing: str,
                                 every_n: int | None = None, *, early_stop: bool = True) -> float:
    """Forward FLOPs per token that checkpointing runs a second time in the backward pass.

    full: every block's forward; selective: every block's core attention (QKᵀ and ·V; Korthikanti et al.
    2022, sec. 5), or with `every_n` every n-th whole block; attention: every block's attention sub-layer
    (its projections too); none: nothing. The logits are never recomputed.

    `early_stop`: PyTorch's non-reentrant checkpoint (what every backend here uses) stops re-running a
    region once the tensors its backward needs exist again (`torch.utils.checkpoint.set_checkpoint_early_stop`,
    on by default), so the region's last GEMM, whose output nothing saves, is not recomputed: ·V of core
    attention, the output projection of the attention sub-layer, the MLP's down projection of a block
    (counted exactly by tests/test_flops.py). Megatron's own checkpoint re-runs the whole region.
    """
    block = fwd.layer - (fwd.mlp_proj if early_stop else 0.0)
    region = CHECKPOINTING[activation_checkpointing].region
    if every_n is not None and region:  # every n-th whole block instead
        return fwd.n_layers // every_n * block
    recomputed = {"block": block, "attn.core": fwd.attn_core / (2 if early_stop else 1),
                  "attn": fwd.attn_gemms + fwd.attn_core - (fwd.attn_proj if early_stop else 0.0), "": 0.0}
    return fwd.n_layers * recomputed[region]


@dataclass(frozen=True)
class StepFlops:
    model: float
    """Model FLOPs per optimizer step (what MFU divides)."""
    hardware: float
    """Model FLOPs plus recompute (what HFU divides)."""


def step_flops(m: ModelDims, global_batch_size: int, activation_checkpointing: str = "none",
               checkpoint_every_n: int | None = None, *, early_stop: bool = True) -> StepFlops:
    """Training FLOPs of one optimizer step over the whole global batch (all ranks together)."""
    fwd = forward_flops_per_token(m)
    tokens = global_batch_size * m.seq_len
    model = 3 * (fwd.n_layers * fwd.layer + fwd.logits) * tokens
    recomputed = recomputed_forward_per_token(fwd, activation_checkpointing, checkpoint_every_n,
                                              early_stop=early_stop)
    return StepFlops(model=model, hardware=model + recomputed * tokens)
