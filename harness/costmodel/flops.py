"""Parameter and FLOP counts of the GPT in `models/gpt.py`, from its dimensions alone.

Model FLOPs follow Megatron-LM's `num_floating_point_operations` (megatron/training/training.py):
GEMMs only, 2·m·n·k per GEMM, training = 3 × forward (forward, weight grad, data grad), GQA and
SwiGLU aware, logits included, causal attention counted once (the masked half of QK^T and AV is
not counted), no recompute. Hardware FLOPs add the forward passes that activation checkpointing
recomputes. MFU uses model FLOPs, HFU hardware FLOPs (Chowdhery et al. 2022, PaLM, appendix B).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class ModelDims(Protocol):
    """Anything with the model fields: `harness.config.ModelConfig`, `models.gpt.GPTConfig`, a DictConfig."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int | None
    ffn_hidden: int | None
    seq_len: int
    vocab_size: int
    activation: str
    norm: str
    position: str
    tie_embeddings: bool
    bias: bool


def _dims(m: Any) -> tuple[int, int, int, int, int, int, int]:
    """(layers, hidden, query heads, kv heads, head size, ffn width, vocab)."""
    kv = m.n_kv_heads if m.n_kv_heads is not None else m.n_heads
    ffn = m.ffn_hidden if m.ffn_hidden is not None else 4 * m.d_model
    return m.n_layers, m.d_model, m.n_heads, kv, m.d_model // m.n_heads, ffn, m.vocab_size


def param_count(m: ModelDims) -> int:
    """Exact trainable parameters of `models.gpt.GPT` (tied embeddings counted once)."""
    layers, h, a, g, dh, f, vocab = _dims(m)
    b = 1 if m.bias else 0
    norm = h * (2 if m.norm == "layernorm" and m.bias else 1)
    mlp_in = 2 if m.activation == "swiglu" else 1
    per_layer = (
        h * (a + 2 * g) * dh + b * (a + 2 * g) * dh  # fused qkv
        + a * dh * h + b * h  # attention output projection
        + mlp_in * (h * f + b * f)  # fc (and gate)
        + f * h + b * h  # mlp output projection
        + 2 * norm
    )
    embeddings = vocab * h + (m.seq_len * h if m.position == "learned" else 0)
    head = 0 if m.tie_embeddings else vocab * h
    return embeddings + layers * per_layer + norm + head


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
    )


def recomputed_forward_per_token(fwd: ForwardFlops, activation_checkpointing: str,
                                 every_n: int | None = None) -> float:
    """Forward FLOPs per token that checkpointing runs a second time in the backward pass.

    full: every block's forward; selective: the attention sub-layer of every block (what this
    harness checkpoints), or with `every_n` every n-th whole block; none: nothing. The logits are
    never recomputed.
    """
    if activation_checkpointing == "full":
        return fwd.n_layers * fwd.layer
    if activation_checkpointing == "selective" and every_n is not None:
        return fwd.n_layers // every_n * fwd.layer
    if activation_checkpointing == "selective":
        return fwd.n_layers * (fwd.attn_gemms + fwd.attn_core)
    return 0.0


@dataclass(frozen=True)
class StepFlops:
    model: float
    """Model FLOPs per optimizer step (what MFU divides)."""
    hardware: float
    """Model FLOPs plus recompute (what HFU divides)."""


def step_flops(m: ModelDims, global_batch_size: int, activation_checkpointing: str = "none",
               checkpoint_every_n: int | None = None) -> StepFlops:
    """Training FLOPs of one optimizer step over the whole global batch (all ranks together)."""
    fwd = forward_flops_per_token(m)
    tokens = global_batch_size * m.seq_len
    model = 3 * (fwd.n_layers * fwd.layer + fwd.logits) * tokens
    recomputed = recomputed_forward_per_token(fwd, activation_checkpointing, checkpoint_every_n)
    return StepFlops(model=model, hardware=model + recomputed * tokens)
