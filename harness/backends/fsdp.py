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
from harness.config.checks import compute_precision, reduce_precision
from harness.core.registry import fsdp_replica_group
from harness.models.config import block_linears

REPLICA_DIMS = ("dp_replicate", "dp_shard")


def vocab_parallel_head(model: nn.Module) -> bool:
    """Whether TP splits the output layer over the vocabulary: a whole model (not a pipeline stage, whose loss the
    schedule computes) with its own output weight (a tied one is the embedding's, which stays replicated)."""
    return (getattr(model, "lm_head", None) is not None and getattr(model, "tok_emb", None) is not None
            and not model.config.tie_embeddings)


def apply_tensor_parallel(model: nn.Module, tp_mesh: Any, *, sequence_parallel: bool) -> None:
    """Megatron's split of every block by submodule name (torchtitan's plan).

    The model's description (harness.models.config.block_linears) says which linears split by output columns
    (qkv, fc, gate) and which by input rows (the projections), so each block needs one all-reduce in forward per
    sub-layer. The model infers its local head count from qkv's
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
    linears = block_linears(model.config)
    for block in model.blocks:
        plan: dict[str, Any] = {spec.name: ColwiseParallel() if spec.split == "column" else RowwiseParallel(**residual)
                                for spec in linears}
        if sequence_parallel:
            plan.update({
                "norm1": SequenceParallel(),
                "norm2": SequenceParallel(),
                "attn": PrepareModuleInput(input_layouts=(Shard(1), None),
                                           desired_input_layouts=(Replicate(), None)),
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            })
        parallelize_module(block, tp_mesh, plan)
    if vocab_parallel_head(model):
        # torchtitan's loss parallel: the output layer split over the vocabulary and its logits left split, so
        # each rank computes V/TP of them and the loss reduces across ranks (train_step's loss_parallel()).
        parallelize_module(model, tp_mesh, {"lm_head": ColwiseParallel(output_layouts=Shard(-1),
                                                                       use_local_output=False)})
    # The residual stream enters the sequence-split region at the first block and leaves it for the replicated
    # final norm and head (a pipeline stage's own first and last block; a stage may hold none).
    if sequence_parallel and len(model.blocks):
        parallelize_module(model.blocks[0], tp_mesh,
                           PrepareModuleInput(input_layouts=(Replicate(), None),
                                              desired_input_layouts=(Shard(1), None)))
        parallelize_module(model.blocks[-1], tp_mesh,
                           PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate()))


class FSDPBackend(FabricBackend):
    name = "fsdp"
    pp_group: Any = None
    """The pipeline-parallel process group (harness.backends.pipeline); None without pipeline stages."""

    @property
    def dp_rank(self) -> int:
        # the data-parallel mesh dimension holds dp·cp ranks; a context-parallel group's cp ranks read one share
        return self.fabric.strategy.device_mesh["data_parallel"].get_local_rank() // self.layout.cp

    @property
    def shard_ranks(self) -> int:
        """Ranks that reduce gradients and shard parameters: every data- and context-parallel rank."""
        return self.layout.dp * self.layout.cp

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

    def setup(self, model: nn.Module) -> None:
        self.scaler = self.loss_scaler()
        super().setup(model)

    def loss_scaler(self) -> LossScaler | None:
        return LossScaler(self.cfg, self.device) if self.cfg.train.precision == "fp16" else None

    def strategy(self) -> Any:
        from lightning_fabric.strategies import ModelParallelStrategy

        return ModelParallelStrategy(
            parallelize_fn=self.parallelize,
            data_parallel_size=self.shard_ranks,
            tensor_parallel_size=self.layout.tp,
            timeout=timedelta(seconds=self.cfg.launcher.pg_timeout_s),
        )

    def replica_group(self) -> int | None:
        """Ranks sharding one replica under hybrid_shard / no_shard (None: all data-parallel ranks shard one)."""
        b = self.cfg.backend
        if b.sharding not in ("no_shard", "hybrid_shard"):
            return None
        return fsdp_replica_group(b.sharding, b.hybrid_shard_group, self.cfg.system.devices_per_node, self.shard_ranks,
                                  self.layout.tp)

    def data_parallel_dims(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """Sizes and names of the data-parallel mesh dimensions: one, or (replicate, shard) for HSDP."""
        group = self.replica_group()
        if group is None:
            return (self.shard_ranks,), ("data_parallel",)
        return (self.shard_ranks // group, group), REPLICA_DIMS

    def full_mesh(self, fabric_mesh: Any) -> Any:
        """Fabric's (data_parallel, tensor_parallel) mesh, or for HSDP one that splits data_parallel in two.

        FSDP2 requires the data-parallel and tensor-parallel meshes of a parameter to share one root
        mesh, so the split mesh also supplies the tensor-parallel dimension. Ranks are laid out
        row-major in both, so a rank's data-parallel index (which data it reads) is unchanged.
        """
        if self.replica_group() is None:
            return fabric_mesh
        from torch.distributed.device_mesh import init_device_mesh

        sizes, names = self.data_parallel_dims()
        return init_device_mesh(self.device.type, (*sizes, self.layout.tp), mesh_dim_names=(*names, "tensor_parallel"))

    def parallelize(self, model: nn.Module, fabric_mesh: Any) -> nn.Module:
        return self.shard(model, self.full_mesh(fabric_mesh))

    def shard(self, model: nn.Module, mesh: Any, reshard_after_forward: bool = True,
              first_block: int = 0) -> nn.Module:
        """Tensor parallelism, checkpointing, compile, then `fully_shard` every block and the root.

        `mesh` has a `tensor_parallel` dimension and the data-parallel ones of `data_parallel_dims`.
        `reshard_after_forward=False` keeps every sharding strategy's parameters gathered until the backward;
        `first_block` is the model's index of a pipeline stage's first block.
        """
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        b, train = self.cfg.backend, self.cfg.train
        if self.layout.tp > 1:
            apply_tensor_parallel(model, mesh["tensor_parallel"],
                                  sequence_parallel=self.cfg.parallel.sequence_parallel)
            self.loss_parallel = vocab_parallel_head(model)
        checkpoint_and_compile(model, train, first_block)
        names = self.data_parallel_dims()[1]
        options = dict(
            mesh=mesh[names],
            reshard_after_forward=reshard_after_forward and b.sharding in ("full_shard", "hybrid_shard"),
            mp_policy=MixedPrecisionPolicy(param_dtype=DTYPES[compute_precision(self.cfg)],
                                           reduce_dtype=DTYPES[reduce_precision(self.cfg)]),
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

    loss_parallel = False
    """The logits stay split over the TP ranks' vocabulary slices (vocab_parallel_head)."""

    def loss_context(self) -> Any:
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel() if self.loss_parallel else super().loss_context()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.scaler is None else self.scaler.scale(loss)

    def optimizer_step(self) -> None:
        """With fp16: unscale before clipping, and skip the update on ranks' agreed overflow (the scaler)."""
        if self.scaler is None:
            return super().optimizer_step()
        self.grad_norm = self.scaler.step(self.optimizer, self.clip_gradients if self.cfg.train.grad_clip > 0
                                          else None, self.cfg.train.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)

    def step_notes(self) -> dict[str, Any]:
        return {**super().step_notes(), **({} if self.scaler is None else self.scaler.step_notes())}

    def summary_notes(self) -> dict[str, dict[str, Any]]:
        if self.scaler is None:
            return {}
        return {"metrics": {"skipped_steps": self.scaler.skipped, "loss_scale": self.scaler.scale_now}}

    def counted_once(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """The parameters whose gradients the global norm counts: a copy held for another stage is left out."""
        return params

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Clip by the global gradient norm when parameters live on different meshes (and stages); returns it.

        With tensor parallelism the blocks' parameters are DTensors on the 2-D (data, tensor) mesh
        and the embeddings on the data-parallel mesh alone; `clip_grad_norm_` cannot stack norms
        from two meshes, so each mesh's norm is reduced to a plain tensor first (torchtitan does the same).
        Pipeline stages add their squared norms over the pipeline group, as torchtitan's `clip_grad_norm_`.
        """
        from torch.distributed.tensor import DTensor

        by_mesh: dict[Any, list[nn.Parameter]] = {}
        for p in self.parameters():
            if p.grad is not None:
                by_mesh.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
        squares = torch.zeros((), device=self.device)
        for params in by_mesh.values():
            counted = self.counted_once(params)
            if not counted:
                continue
            norm = torch.nn.utils.get_total_norm([p.grad for p in counted])
            squares = squares + (norm.full_tensor() if isinstance(norm, DTensor) else norm).float().square()
        if self.pp_group is not None:
            torch.distributed.all_reduce(squares, group=self.pp_group)
        total_norm = squares.sqrt()
        for params in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)
        return total_norm


class LossScaler:
    """fp16's dynamic loss scaling for sharded gradients: torch's `ShardedGradScaler`.

    `torch.amp.GradScaler` checks only this rank's gradient shards for overflow, so ranks could disagree on
    skipping a step; `ShardedGradScaler` (torch.distributed.fsdp) all-reduces the overflow flag over every
    rank first, and unscales FSDP2's DTensor shards in place. The scale starts at
    2**backend.initial_scale_power, halves on an overflow (the step is skipped) and doubles after
    backend.loss_scale_window clean steps, DeepSpeed's rule without its hysteresis and floor.
    """

    def __init__(self, cfg: Any, device: torch.device) -> None:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        b = cfg.backend
        self.scaler = ShardedGradScaler(device=device.type, init_scale=2.0 ** b.initial_scale_power,
                                        growth_interval=b.loss_scale_window)
        self.scaler.scale(torch.zeros((), device=device))  # creates the scale on ranks that never see a loss
        self.skipped, self.last_skipped = 0, False

    @property
    def scale_now(self) -> float:
        return float(self.scaler.get_scale())

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def step(self, optimizer: Any, clip: Any, max_norm: float) -> torch.Tensor | None:
        """Unscale, clip, then step unless some rank overflowed (the scale drops exactly then); returns the
        gradient norm `clip` measured."""
        self.scaler.unscale_(optimizer)
        norm = clip(max_norm) if clip is not None else None
        before = self.scale_now
        self.scaler.step(optimizer)
        self.scaler.update()
        self.last_skipped = self.scale_now < before
        self.skipped += self.last_skipped
        return norm

    def step_notes(self) -> dict[str, Any]:
        """As DeepSpeed's: steps skipped in this step (0 or 1), and the scale the next step uses."""
        return {"skipped_steps": int(self.last_skipped), "loss_scale": self.scale_now}


def set_prefetch(blocks: list[Any], depth: int) -> None:
    """Each block all-gathers the next `depth` blocks in forward and the previous `depth` in backward.

    FSDP2 by default prefetches one block, implicitly; explicit prefetch issues the all-gathers
    earlier and further ahead (more overlap, more memory held), FSDP1's BACKWARD_PRE and forward_prefetch.
    """
    for i, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[i + 1:i + 1 + depth])
        block.set_modules_to_backward_prefetch(blocks[max(0, i - depth):i][::-1])
