"""Fully sharded data parallelism: FSDP2 (`fully_shard`) through Lightning Fabric's ModelParallelStrategy.

Fabric's FSDPStrategy wraps FSDP1 and refuses CPU; ModelParallelStrategy hands our `parallelize`
function a (data_parallel, tensor_parallel) device mesh, as torchtitan's trainer does, and works on
gloo and NCCL alike. `parallelize` follows torchtitan's order: tensor parallelism, activation
checkpointing, compile, then FSDP over the data-parallel ranks. Mixed precision is FSDP2's own policy,
so Fabric itself runs at "32-true".

FSDP1's sharding strategies map onto FSDP2 as:
  full_shard     fully_shard(reshard_after_forward=True) on a 1-D data-parallel mesh
  shard_grad_op  fully_shard(reshard_after_forward=False): parameters stay gathered until backward
  hybrid_shard   a 2-D (replicate, shard) mesh: FSDP2's HSDP, sharded within a group, replicated across
  no_shard       the same 2-D mesh with groups of one: every rank holds everything (DDP)
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
from torch import nn

from harness.backends.base import DTYPES, FabricBackend, checkpoint_and_compile, materialize
from harness.backends.registry import fsdp_replica_group

REPLICA_DIMS = ("dp_replicate", "dp_shard")


def apply_tensor_parallel(model: nn.Module, tp_mesh: Any, *, sequence_parallel: bool) -> None:
    """Megatron's split of every block by submodule name (torchtitan's plan).

    qkv, fc and gate are split by output columns and the projections by input rows, so each block
    needs one all-reduce in forward per sub-layer. The model infers its local head count from qkv's
    width. With sequence parallelism the norms and residual stream are split along the sequence
    instead of replicated, and the all-reduces become reduce-scatter / all-gather pairs.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    # With sequence parallelism the residual stream stays a DTensor split along the sequence.
    residual = dict(output_layouts=Shard(1), use_local_output=False) if sequence_parallel else {}
    for block in model.blocks:
        plan: dict[str, Any] = {
            "attn.qkv": ColwiseParallel(),
            "attn.proj": RowwiseParallel(**residual),
            "mlp.fc": ColwiseParallel(),
            "mlp.proj": RowwiseParallel(**residual),
        }
        if hasattr(block.mlp, "gate"):
            plan["mlp.gate"] = ColwiseParallel()
        if sequence_parallel:
            plan.update({
                "norm1": SequenceParallel(),
                "norm2": SequenceParallel(),
                "attn": PrepareModuleInput(input_layouts=(Shard(1), None),
                                           desired_input_layouts=(Replicate(), None)),
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            })
        parallelize_module(block, tp_mesh, plan)
    if sequence_parallel:  # the residual stream enters the sequence-split region at the first block
        parallelize_module(model.blocks[0], tp_mesh,  # and leaves it for the replicated final norm and head
                           PrepareModuleInput(input_layouts=(Replicate(), None),
                                              desired_input_layouts=(Shard(1), None)))
        parallelize_module(model.blocks[-1], tp_mesh,
                           PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate()))


class FSDPBackend(FabricBackend):
    name = "fsdp"

    @property
    def dp_rank(self) -> int:
        return self.fabric.strategy.device_mesh["data_parallel"].get_local_rank()

    def precision(self) -> str:
        return "32-true"

    @property
    def materialize_before_setup(self) -> bool:
        """With CPU offload FSDP2 shards parameters that are already on the CPU (it refuses others), so the
        model is built there whole, and Fabric must not move it to the GPU first."""
        return self.cfg.backend.offload or super().materialize_before_setup

    @property
    def move_to_device(self) -> bool:
        return not self.cfg.backend.offload

    def prepare(self, model: nn.Module) -> None:
        """Nothing before Fabric: checkpointing and compile come after tensor parallelism, in `parallelize`."""

    def strategy(self) -> Any:
        from lightning.fabric.strategies import ModelParallelStrategy

        return ModelParallelStrategy(
            parallelize_fn=self.parallelize,
            data_parallel_size=self.layout.dp,
            tensor_parallel_size=self.layout.tp,
            timeout=timedelta(seconds=self.cfg.launcher.pg_timeout_s),
        )

    def replica_group(self) -> int | None:
        """Ranks sharding one replica under hybrid_shard / no_shard (None: all data-parallel ranks shard one)."""
        b = self.cfg.backend
        if b.sharding not in ("no_shard", "hybrid_shard"):
            return None
        return fsdp_replica_group(b.sharding, b.hybrid_shard_group, self.cfg.system.devices_per_node, self.layout.dp)

    def full_mesh(self, fabric_mesh: Any) -> Any:
        """Fabric's (data_parallel, tensor_parallel) mesh, or for HSDP one that splits data_parallel in two.

        FSDP2 requires the data-parallel and tensor-parallel meshes of a parameter to share one root
        mesh, so the split mesh also supplies the tensor-parallel dimension. Ranks are laid out
        row-major in both, so a rank's data-parallel index (which data it reads) is unchanged.
        """
        group = self.replica_group()
        if group is None:
            return fabric_mesh
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.layout.dp // group, group, self.layout.tp),
                                mesh_dim_names=(*REPLICA_DIMS, "tensor_parallel"))

    def parallelize(self, model: nn.Module, fabric_mesh: Any) -> nn.Module:
        """Tensor parallelism, checkpointing, compile, then `fully_shard` every block and the root."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        b, train = self.cfg.backend, self.cfg.train
        mesh = self.full_mesh(fabric_mesh)
        if self.layout.tp > 1:
            apply_tensor_parallel(model, mesh["tensor_parallel"],
                                  sequence_parallel=self.cfg.parallel.sequence_parallel)
        checkpoint_and_compile(model, train)
        dp_mesh = mesh[REPLICA_DIMS] if self.replica_group() is not None else mesh["data_parallel"]
        options = dict(
            mesh=dp_mesh,
            reshard_after_forward=b.sharding in ("full_shard", "hybrid_shard"),
            mp_policy=MixedPrecisionPolicy(param_dtype=DTYPES[b.param_dtype or train.precision],
                                           reduce_dtype=DTYPES[b.reduce_dtype or "fp32"]),
            offload_policy=(CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if b.offload
                            else OffloadPolicy()),
        )
        blocks = list(model.blocks)
        for block in blocks:
            fully_shard(block, **options)
        fully_shard(model, **options)
        materialize(model, self.device)  # a meta-built model (GPU) gets only its shards, with GPT's init
        if b.prefetch_depth:
            set_prefetch(blocks, b.prefetch_depth)
        return model

    def clip_gradients(self, max_norm: float) -> None:
        """Clip by the global gradient norm when parameters live on different meshes.

        With tensor parallelism the blocks' parameters are DTensors on the 2-D (data, tensor) mesh
        and the embeddings on the data-parallel mesh alone; `clip_grad_norm_` cannot stack norms
        from two meshes, so each mesh's norm is reduced to a plain tensor first (torchtitan does the same).
        """
        from torch.distributed.tensor import DTensor

        by_mesh: dict[Any, list[nn.Parameter]] = {}
        for p in self.model.parameters():
            if p.grad is not None:
                by_mesh.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
        norms = []
        for params in by_mesh.values():
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        total_norm = torch.linalg.vector_norm(torch.stack(norms))
        for params in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)

def set_prefetch(blocks: list[Any], depth: int) -> None:
    """Each block all-gathers the next `depth` blocks in forward and the previous `depth` in backward.

    FSDP2 by default prefetches one block, implicitly; explicit prefetch issues the all-gathers
    earlier and further ahead (more overlap, more memory held), FSDP1's BACKWARD_PRE and forward_prefetch.
    """
    for i, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[i + 1:i + 1 + depth])
        block.set_modules_to_backward_prefetch(blocks[max(0, i - depth):i][::-1])
