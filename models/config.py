"""The GPT's shape, torch-free: one dataclass shared by the model, the config schema, the checks and the
cost model, so a field or a rule is written once.

`ffn_hidden` and `n_kv_heads` may stay None (meaning 4·d_model and n_heads); read the resolved widths
through `ffn_width` and `kv_heads`. Nothing is filled in at construction: the Hydra schema inherits
this class, and a default baked in there would outlive a later `d_model` override.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")
NORMS = ("layernorm", "rmsnorm")
ATTENTIONS = ("sdpa", "flash_attn", "math")
NORM_IMPLS = ("torch", "apex")
POSITIONS = ("learned", "rope")


class ModelConfigError(ValueError):
    """A shape the model cannot be built with; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class GPTConfig:
    """Shape and flavour of a GPT decoder (GPT-2 defaults, Llama-like options)."""

    n_layers: int = 2
    """Number of transformer blocks."""
    d_model: int = 64
    """Residual stream (hidden) width."""
    n_heads: int = 4
    """Number of query heads; head_dim = d_model // n_heads."""
    n_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention; None means n_heads (plain multi-head)."""
    ffn_hidden: Optional[int] = None
    """MLP inner width; None means 4 * d_model."""
    seq_len: int = 128
    """Tokens per sample (size of the learned position table / RoPE cache)."""
    vocab_size: int = 512
    """Number of token ids, already padded (Megatron pads GPT-2's 50257 to a multiple of 128 or 1024)."""
    activation: str = "gelu"
    """MLP nonlinearity: gelu (exact erf, Megatron default), gelu_tanh (GPT-2 gelu_new) or swiglu."""
    norm: str = "layernorm"
    """Normalisation layer: layernorm or rmsnorm."""
    position: str = "learned"
    """Positions: learned (absolute embedding table) or rope (rotary, applied to q and k)."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output projection."""
    bias: bool = True
    """Biases in linears and norms (GPT-2: True; Llama-like: False)."""
    norm_eps: float = 1e-5
    """Epsilon of every normalisation layer."""
    init_std: float = 0.02
    """Std of the normal initialisation of weights and embeddings."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    attention: str = "sdpa"
    """Attention kernel: sdpa (PyTorch's scaled_dot_product_attention, which picks flash, memory-efficient or
    math itself), flash_attn (the flash-attn package's flash_attn_func; CUDA, fp16/bf16), math (softmax(QKᵀ)V
    written out: the reference)."""
    norm_impl: str = "torch"
    """Normalisation kernels: torch (nn.LayerNorm / nn.RMSNorm) or apex (NVIDIA apex's FusedLayerNorm /
    FusedRMSNorm; CUDA)."""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def ffn_width(self) -> int:
        return self.ffn_hidden if self.ffn_hidden is not None else 4 * self.d_model

    @classmethod
    def from_section(cls, section: Any) -> "GPTConfig":
        """This dataclass from any object or mapping with its fields (a DictConfig's `model` section, which
        also carries a `name`)."""
        if isinstance(section, cls):
            return section
        get = section.__getitem__ if hasattr(section, "__getitem__") else lambda key: getattr(section, key)
        return cls(**{f.name: get(f.name) for f in dataclasses.fields(cls)})

    def check(self, prefix: str = "") -> None:
        """Raise ModelConfigError, naming the field (with `prefix`, e.g. 'model.') and the fix, for a shape
        the model cannot have."""
        for name in ("n_layers", "d_model", "n_heads", "seq_len", "vocab_size", "n_kv_heads", "ffn_hidden"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ModelConfigError(name, f"{prefix}{name}={value}: must be at least 1")
        if self.d_model % self.n_heads:
            raise ModelConfigError("d_model", (
                f"{prefix}d_model={self.d_model} is not divisible by {prefix}n_heads={self.n_heads}; choose "
                f"n_heads from the divisors of d_model (e.g. {nearest_divisor(self.d_model, self.n_heads)})"))
        if self.n_heads % self.kv_heads:
            raise ModelConfigError("n_kv_heads", (
                f"{prefix}n_kv_heads={self.kv_heads} does not divide {prefix}n_heads={self.n_heads}; "
                f"choose a divisor (e.g. {nearest_divisor(self.n_heads, self.kv_heads)})"))
        for name, choices in (("activation", ACTIVATIONS), ("norm", NORMS), ("position", POSITIONS),
                              ("attention", ATTENTIONS), ("norm_impl", NORM_IMPLS)):
            if getattr(self, name) not in choices:
                raise ModelConfigError(name, f"{prefix}{name}={getattr(self, name)}: unknown value; "
                                             f"choose one of: {', '.join(choices)}")
        if self.position == "rope" and self.head_dim % 2:
            raise ModelConfigError("position", f"{prefix}position=rope needs an even head_dim, got "
                                               f"{self.head_dim}; change d_model or n_heads")


@dataclass(frozen=True)
class Linear:
    """One linear layer of a block, as the model file names it, and how tensor parallelism splits it (Megatron's
    ColumnParallelLinear / RowParallelLinear, torch's ColwiseParallel / RowwiseParallel).

    `column` splits the output features: each rank computes whole heads (qkv is laid out per KV group) or whole
    FFN columns. `row` splits the input features: the layer's partial sums end in an all-reduce into the residual
    stream, and its weights start at the residual branches' scaled init (GPT-2, Megatron)."""

    name: str
    """Module path inside a block (`blocks[i].<name>`)."""
    n_in: int
    n_out: int
    split: str
    """column | row."""

    @property
    def residual(self) -> bool:
        """Writes into the residual stream (the row-parallel projections): scaled init, TP all-reduce."""
        return self.split == "row"

    def on_rank(self, tp: int) -> tuple[int, int]:
        """(input, output) features one of `tp` ranks multiplies: a column split divides the output, a row split
        the input."""
        return (self.n_in, self.n_out // tp) if self.split == "column" else (self.n_in // tp, self.n_out)


def block_linears(config: GPTConfig) -> tuple[Linear, ...]:
    """A block's linears in forward order: the one description the model, the backends' tensor-parallel plans and
    the cost model's shapes all read."""
    h, q = config.d_model, config.n_heads * config.head_dim
    qkv = (config.n_heads + 2 * config.kv_heads) * config.head_dim
    gate = (Linear("mlp.gate", h, config.ffn_width, "column"),) if config.activation == "swiglu" else ()
    return (Linear("attn.qkv", h, qkv, "column"), Linear("attn.proj", q, h, "row"),
            Linear("mlp.fc", h, config.ffn_width, "column"), *gate, Linear("mlp.proj", config.ffn_width, h, "row"))


def nearest_divisor(n: int, near: int) -> int:
    """The divisor of n closest to `near` (the smaller on a tie): the fix an error message suggests."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - near), d))
