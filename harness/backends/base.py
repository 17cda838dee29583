"""The one interface every parallel backend implements, and the pieces the Fabric backends share.

A backend receives a model built from `harness.models.gpt` (no parallelism inside it), parallelizes it,
owns the optimizer, and runs one optimizer step over this rank's micro-batches. The runner owns
everything else: process groups, data, timing, metrics and the run directory.
"""

from __future__ import annotations

import contextlib
import functools
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from harness.backends.context import ContextParallel
from harness.core.layout import Layout
from harness.core.registry import CHECKPOINTING, resolve_optimizer
from harness.trace.capture import phase
from harness.trace.events import PHASES

MicroBatch = tuple[torch.Tensor, torch.Tensor]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Backend(ABC):
    name: str

    def __init__(self, cfg: Any, layout: Layout, device: torch.device) -> None:
        self.cfg, self.layout, self.device = cfg, layout, device

    @property
    def materialize_before_setup(self) -> bool:
        """Whether `setup` wants the full model initialised, not on the meta device.

        DTensor's random ops give sharded parameters the values of an unsharded init only on
        CUDA-like devices; on CPU each shard would draw the same numbers. So on CPU the model is
        initialised whole and then sharded, which keeps layouts comparable step by step.
        """
        return self.device.type == "cpu"

    @abstractmethod
    def setup(self, model: nn.Module) -> None:
        """Parallelize `model` and create the optimizer."""

    @abstractmethod
    def train_step(self, micro_batches: Sequence[MicroBatch]) -> torch.Tensor:
        """One optimizer step; returns this rank's mean loss over its micro-batches (detached)."""

    @property
    @abstractmethod
    def dp_rank(self) -> int:
        """This rank's index within its data-parallel group (which share of the batch it reads)."""

    def run_files(self) -> dict[str, Any]:
        """JSON files the backend generated (e.g. `ds_config.json`), written by rank 0 into the run directory."""
        return {}

    def step_notes(self) -> dict[str, Any]:
        """Extra fields for the last step's line in steps.jsonl (e.g. fp16 steps skipped on overflow)."""
        return {}

    def summary_notes(self) -> dict[str, dict[str, Any]]:
        """Extra fields for summary.json, by block: `layout`, `model` or `metrics`."""
        return {}

    def local_params(self) -> int | None:
        """Parameter elements this rank stores after `setup` (what the layout shards); None if unknown."""
        return None

    def state_objects(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The module (all of this rank's stages) and optimizer whose state a checkpoint holds."""
        raise NotImplementedError(f"backend={self.name} cannot save its state")

    def _state(self) -> dict[str, Any]:
        """Model and optimizer state dicts as torch.distributed.checkpoint reads and writes them: plain tensors or
        DTensor shards, keyed by the model's own parameter names, so a checkpoint can load into another layout."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = self.state_objects()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def save_state(self, path: Path) -> None:
        """Write model and optimizer state into the directory `path`, each rank its shards (every rank calls)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(path))

    def save_state_async(self, path: Path, group: Any) -> Any:
        """Stage the state in host memory, then write it in a background thread on `group` (a process group of its
        own, so its collectives never interleave with training's); returns the write's future."""
        import torch.distributed.checkpoint as dcp

        return dcp.async_save(self._state(), checkpoint_id=str(path), process_group=group)

    def load_state(self, path: Path) -> None:
        """Read what `save_state` wrote, resharded to this layout where the shapes allow (every rank calls)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(path))
        model, optimizer = self.state_objects()
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def build_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The AdamW implementation train.optimizer resolves to for this backend and device."""
        kind = resolve_optimizer(self.cfg.train.optimizer, self.cfg.backend.name, self.device.type)
        return make_optimizer(params, self.cfg.train, kind)


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate a model built on the meta device and give it the model's own init (`GPT.init_weights`).

    Every rank seeds the same RNG, so replicas start identical. Fabric would otherwise allocate meta
    modules itself and run PyTorch's per-layer `reset_parameters` (not GPT's init, and no re-tying of
    the embeddings), or, for DDP, fail to copy meta tensors to the device. Sharded (FSDP2) models call
    this after `fully_shard`, so each rank allocates only its shards (torchtitan's order).
    """
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=device)
        model.init_weights()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: collectives on it update the DTensor), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def checkpoint_inside_block(block: nn.Module, mode: str) -> None:
    """Wrap the part of one block that `mode` recomputes (its region in core.registry.CHECKPOINTING: the core
    attention, or the attention sub-layer), found by the model's module names."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    region = CHECKPOINTING[mode].region
    if region in ("", "block"):
        return
    *path, name = region.split(".")
    parent = functools.reduce(getattr, path, block)
    setattr(parent, name, checkpoint_wrapper(getattr(parent, name), preserve_rng_state=False))


def apply_activation_checkpointing(model: nn.Module, mode: str, every_n: int | None = None,
                                   first_block: int = 0) -> None:
    """Recompute activations in the backward pass: every block (full), in every block its core attention
    (selective) or its attention sub-layer (attention), or with `every_n` every n-th whole block (blocks n-1,
    2n-1, ...: torchtitan's count, over the whole model: a pipeline stage's blocks start at `first_block`).

    Uses PyTorch's non-reentrant checkpoint wrapper, as torchtitan does; it must be applied before
    FSDP wraps the blocks.
    """
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.blocks):
        if CHECKPOINTING[mode].region == "block" or (every_n is not None and (first_block + i + 1) % every_n == 0):
            model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
        elif every_n is None:
            checkpoint_inside_block(block, mode)


def checkpoint_and_compile(model: nn.Module, train: Any, first_block: int = 0) -> None:
    """Activation checkpointing, then `torch.compile` of each block in place (torchtitan's order).

    Compiling block by block keeps the module names (so sharding wraps the same blocks) and lets
    each repeated block reuse one compiled graph.
    """
    apply_activation_checkpointing(model, train.activation_checkpointing, train.checkpoint_every_n, first_block)
    if train.compile:
        for block in model.blocks:
            block.compile(backend=train.compile_backend)


def make_optimizer(params: Any, train: Any, kind: str = "adamw") -> torch.optim.Optimizer:
    """AdamW with GPT-3's betas, the same update for every backend so their losses compare; `kind`
    (train.optimizer, resolved) picks the implementation."""
    hyper = {"lr": train.lr, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": train.weight_decay}
    if kind == "apex_fused_adam":
        from apex.optimizers import FusedAdam

        return FusedAdam(params, adam_w_mode=True, **hyper)
    if kind not in ("adamw", "adamw_foreach", "adamw_fused"):
        raise ValueError(f"train.optimizer={kind}: not an optimizer this backend builds")
    return torch.optim.AdamW(params, foreach=True if kind == "adamw_foreach" else None,
                             fused=True if kind == "adamw_fused" else None, **hyper)


class FabricBackend(Backend):
    """Shared step loop for the backends that Lightning Fabric drives (its strategy differs)."""

    fabric_precision = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}

    @abstractmethod
    def strategy(self) -> Any:
        """The Fabric strategy object."""

    def precision(self) -> str:
        return self.fabric_precision[self.cfg.train.precision]

    @property
    def move_to_device(self) -> bool:
        """Whether Fabric moves the whole model to the device before the strategy wraps it."""
        return True

    def prepare(self, model: nn.Module) -> None:
        """What happens to the plain model before Fabric wraps it (a backend that parallelizes
        blocks itself does this inside its own parallelize function instead)."""
        materialize(model, self.device)
        checkpoint_and_compile(model, self.cfg.train)

    context: ContextParallel | None = None
    """This rank's part in context parallelism (parallel.cp > 1)."""

    def setup(self, model: nn.Module) -> None:
        from lightning_fabric import Fabric
        from lightning_fabric.plugins.environments import TorchElasticEnvironment

        if self.layout.cp > 1:
            self.context = ContextParallel(self.cfg.parallel.cp_kind, self.layout.cp, self.layout.tp, self.device)
            self.context.parallelize(model)
        self.prepare(model)
        # The runner already exported torchrun-style variables for every launcher (srun, mpiexec
        # included) and initialised the process group, so Fabric reads the same rank layout.
        self.fabric = Fabric(
            accelerator=self.device.type,
            devices=int(os.environ["LOCAL_WORLD_SIZE"]),
            num_nodes=int(os.environ["NNODES"]),
            strategy=self.strategy(),
            precision=self.precision(),
            plugins=[TorchElasticEnvironment()],
        )
        self.fabric.launch()
        self.model = self.fabric.setup_module(model, move_to_device=self.move_to_device)
        self.optimizer = self.fabric.setup_optimizers(self.build_optimizer(self.model.parameters()))

    def parameters(self) -> list[nn.Parameter]:
        """The parameters this rank trains."""
        return list(self.model.parameters())

    def state_objects(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        return self.model.module, self.optimizer.optimizer  # under Fabric's wrappers: the model, torch's optimizer

    def local_params(self) -> int | None:
        return sum(local(p).numel() for p in self.parameters())

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Clip by the global gradient norm; returns that norm (before clipping). A non-finite norm is returned,
        not raised: the trainer ends the run `diverged` at that step, on every rank alike."""
        return self.fabric.clip_gradients(self.model, self.optimizer, max_norm=max_norm, error_if_nonfinite=False)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss backward starts from (fp16's loss scaling multiplies it)."""
        return loss

    def loss_context(self) -> Any:
        """Around each micro-batch's forward and backward: where the loss needs one (a vocab-parallel loss)."""
        return contextlib.nullcontext()

    def train_step(self, micro_batches: Sequence[MicroBatch]) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        n = len(micro_batches)
        for i, (inputs, targets) in enumerate(micro_batches):
            kwargs: dict[str, Any] = {}
            around: Any = contextlib.nullcontext()
            if self.context is not None:  # this rank's chunk of each sequence
                inputs, targets, kwargs = self.context.shard(inputs, targets)
                around = self.context.context(self.model.module, inputs, targets)
            with self.fabric.no_backward_sync(self.model, enabled=i < n - 1), around, self.loss_context():
                with phase(PHASES.forward):
                    loss = self.model(inputs, targets, **kwargs)
                with phase(PHASES.backward):
                    self.fabric.backward(self.scale_loss(loss / n))
            total += loss.detach().full_tensor() if hasattr(loss, "full_tensor") else loss.detach()
        with phase(PHASES.optimizer):
            self.optimizer_step()
        return total / n

    grad_norm: torch.Tensor | None = None
    """The step's global gradient norm, measured where train.grad_clip clips by it."""

    def step_notes(self) -> dict[str, Any]:
        """`grad_norm` (read after the step, so it does not wait for the device mid-step), as Megatron logs it."""
        return {} if self.grad_norm is None else {"grad_norm": float(self.grad_norm)}

    def optimizer_step(self) -> None:
        """Clip by the global gradient norm (train.grad_clip), step, and drop the gradients."""
        if self.cfg.train.grad_clip > 0:
            self.grad_norm = self.clip_gradients(self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

