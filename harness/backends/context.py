"""Context parallelism: the ranks of a group share each sequence, each holding a chunk of its tokens.

The model stays as it is (no parallelism inside it): a backend with parallel.cp > 1 builds a `ContextParallel`,
which replaces each block's core attention (the module that sees whole (B, heads, T, head_dim) tensors) and, at
every micro-batch, cuts the rank's chunk out of the sequence and says where the chunk sits (`positions`, for
RoPE or the learned position table).

- ulysses (Jacobs et al. 2023): DeepSpeed's `DistributedAttention` around the core attention; an all-to-all turns
  (B, T/cp, heads) into (B, T, heads/cp) for q, k and v, attention runs on whole sequences, and a second all-to-all
  returns (B, T/cp, heads). Plain collectives, so it runs on gloo too.
- ring (Liu et al. 2023): torch's `context_parallel` context manager, which swaps the CUDA SDPA kernels for ring
  attention over DTensor and shards the named buffers in place, load-balanced for the causal mask (torchtitan's
  CP). CUDA only: `validate` refuses it elsewhere (harness.core.registry.CP_KINDS).

Gradients need nothing extra: every rank of a context-parallel group holds the same parameters, its loss is the
mean over its own chunk, and the data-parallel reduction averages over all dp·cp ranks, which is the mean over
every token of the global batch.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def cp_mesh(cp: int, tp: int, device: torch.device) -> Any:
    """The context-parallel dimension of a (dp, cp, tp) device mesh over all ranks, row-major as the backends lay
    out their (data-parallel, tensor-parallel) mesh: the ranks tp apart that hold the same tensor-parallel shard
    share each sequence (pp = 1: validate refuses context parallelism with pipeline stages)."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = (dist.get_world_size() // (cp * tp), cp, tp)
    return init_device_mesh(device.type, shape, mesh_dim_names=("cp_dp", "cp", "cp_tp"))["cp"]


class _BatchFirst(nn.Module):
    """The model's core attention, which takes (B, heads, T, head_dim), under DistributedAttention's
    (B, T, heads, head_dim) layout."""

    def __init__(self, core: nn.Module) -> None:
        super().__init__()
        self.core = core

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        return self.core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


class UlyssesAttention(nn.Module):
    """DeepSpeed-Ulysses around one block's core attention: (B, heads, T/cp, d) in and out."""

    def __init__(self, core: nn.Module, group: Any, kv_heads: int) -> None:
        """`kv_heads`: this rank's KV heads before the all-to-all (after tensor parallelism's split)."""
        super().__init__()
        import deepspeed
        from deepspeed.sequence.layer import DistributedAttention

        # DeepSpeed's collectives wrap the process group the runner already started (a no-op when it has)
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)

        # scatter the heads (dim 2), gather the sequence (dim 1): batch-first
        self.attention = DistributedAttention(_BatchFirst(core), group, scatter_idx=2, gather_idx=1,
                                              num_kv_heads=kv_heads)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.attention(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                             v.transpose(1, 2).contiguous(), 0)
        return out.transpose(1, 2)


class ContextParallel:
    """One rank's part in context parallelism: which chunk of each sequence it holds, and the attention that lets
    the chunks see each other."""

    def __init__(self, kind: str, cp: int, tp: int, device: torch.device) -> None:
        self.kind, self.cp, self.tp, self.device = kind, cp, tp, device
        self.mesh = cp_mesh(cp, tp, device)
        self.group, self.index = self.mesh.get_group(), self.mesh.get_local_rank()

    def parallelize(self, model: nn.Module) -> None:
        """Before the backend wraps `model`: ulysses replaces each block's core attention (ring swaps the attention
        kernel at run time instead, in `context`)."""
        if self.kind == "ulysses":
            for block in model.blocks:
                block.attn.core = UlyssesAttention(block.attn.core, self.group, model.config.kv_heads // self.tp)

    def shard(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Ulysses: this rank's contiguous chunk of the micro-batch's sequences and, as the model's keyword
        arguments, the chunk's positions. Ring: the whole sequences (`context` shards them in place)."""
        if self.kind == "ring":  # tensors of their own: context_parallel shards them in place
            return inputs.clone(), targets.clone(), {}
        size = inputs.shape[1] // self.cp
        start = self.index * size
        positions = torch.arange(start, start + size, device=inputs.device)
        return inputs[:, start:start + size], targets[:, start:start + size], {"positions": positions}

    def context(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Any:
        """What one micro-batch's forward and backward run under. Ring: torch's context_parallel over the group,
        which shards inputs, targets and the RoPE tables along the sequence in place (two chunks per rank, one
        early and one late, balancing the causal mask) and rings the SDPA kernels; ulysses: nothing."""
        if self.kind != "ring":
            return contextlib.nullcontext()
        from torch.distributed.tensor.experimental import context_parallel

        return context_parallel(self.mesh, buffers=[inputs, targets, model.rope_cos, model.rope_sin],
                                buffer_seq_dims=[1, 1, 0, 0], no_restore_buffers={inputs, targets})
