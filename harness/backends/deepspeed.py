"""Data parallelism with ZeRO stages 0-3 (optionally offloaded to the CPU) through DeepSpeed's engine.

The DeepSpeed JSON is generated from the harness config (`ds_config`), so batch sizes, optimizer,
clipping and precision stay the harness's own fields and every backend trains the same way;
`backend.ds_config` merges extra keys over it. The optimizer is DeepSpeed's config-built AdamW: on a GPU
by default its FusedAdam (what DeepSpeed users benchmark), on a CPU `torch.optim.AdamW` (`"torch_adam":
true`, no compiled extension needed), or whichever `train.optimizer` names; the same update either way.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn

from harness.backends.base import Backend, MicroBatch, checkpoint_and_compile, materialize
from harness.core.console import quiet_library_warnings
from harness.core.layout import Layout
from harness.core.registry import resolve_optimizer
from harness.trace.capture import phase
from harness.trace.events import PHASES


def import_deepspeed(device: torch.device) -> Any:
    """DeepSpeed picks its accelerator once, at import: tell it about a CPU run first."""
    if device.type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    quiet_library_warnings()
    import deepspeed

    return deepspeed


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, recursively (nested dicts merge, anything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


DS_OPTIMIZER = {"adamw": {"torch_adam": True}, "adamw_foreach": {"torch_adam": True, "foreach": True},
                "adamw_fused": {"torch_adam": True, "fused": True}, "deepspeed_fused_adam": {"torch_adam": False}}
"""train.optimizer as DeepSpeed's optimizer params: `torch_adam` builds torch.optim.AdamW with the remaining
params (foreach, fused); without it DeepSpeed builds its FusedAdam (CPUAdam when the optimizer is offloaded)."""


def ds_config(cfg: Any, layout: Layout, device_type: str = "cpu") -> dict[str, Any]:
    """The DeepSpeed JSON for this run: generated fields, then `backend.ds_config` merged over them."""
    train, b = cfg.train, cfg.backend
    zero: dict[str, Any] = {"stage": layout.zero_stage}
    if b.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if b.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    config: dict[str, Any] = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": train.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": train.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": train.weight_decay,
                                                  **DS_OPTIMIZER[resolve_optimizer(train.optimizer, cfg.backend.name,
                                                                                   device_type)]}},
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,  # the harness reports every step itself
        "wall_clock_breakdown": False,
    }
    if train.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": b.initial_scale_power,
                          "loss_scale_window": b.loss_scale_window, "hysteresis": b.hysteresis,
                          "min_loss_scale": b.min_loss_scale}
    elif train.precision == "bf16":
        config["bf16"] = {"enabled": True}
    if cfg.parallel.sequence_parallel:
        # The pipeline engine sends each TP rank 1/tp of an activation and all-gathers it on the next stage,
        # which assumes the TP ranks hold the same activation; under sequence parallelism each holds its own.
        config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    extra = OmegaConf.to_container(b.ds_config, resolve=True) if OmegaConf.is_config(b.ds_config) else b.ds_config
    return merge(config, extra or {})


DEEPSPEED_TAG = "state"
"""The tag (sub-directory) of the one checkpoint a harness checkpoint directory holds."""


class DeepSpeedEngineBackend(Backend):
    """What both DeepSpeed backends share: the generated JSON, the engine, and fp16's skipped steps."""

    def __init__(self, cfg: Any, layout: Layout, device: torch.device) -> None:
        super().__init__(cfg, layout, device)
        self.config = ds_config(cfg, layout, device.type)
        self.deepspeed = import_deepspeed(device)
        # Wrap the process group the runner started (DeepSpeed would otherwise try MPI discovery).
        self.deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
        self._skipped_before = 0

    def run_files(self) -> dict[str, Any]:
        return {"ds_config.json": self.config}

    def initialize(self, model: nn.Module, **kwargs: Any) -> None:
        """`deepspeed.initialize` on the process group the runner already started (DeepSpeed wraps it)."""
        self.engine, *_ = self.deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                    config=self.config, dist_init_required=False, **kwargs)

    def save_state(self, path: Path) -> None:
        """DeepSpeed's own checkpoint (engine.save_checkpoint: module, ZeRO-partitioned optimizer, scheduler)."""
        self.engine.save_checkpoint(str(path), tag=DEEPSPEED_TAG)

    def load_state(self, path: Path) -> None:
        loaded, _ = self.engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint tagged {DEEPSPEED_TAG} under {path}")

    def step_notes(self) -> dict[str, Any]:
        skipped = self.engine.skipped_steps
        new, self._skipped_before = skipped - self._skipped_before, skipped
        return {"skipped_steps": new}

    def summary_notes(self) -> dict[str, dict[str, Any]]:
        engine = getattr(self, "engine", None)
        return {"metrics": {"skipped_steps": engine.skipped_steps if engine is not None else None}}


class DeepSpeedBackend(DeepSpeedEngineBackend):
    name = "deepspeed"

    @property
    def dp_rank(self) -> int:
        return self.engine.global_rank

    def setup(self, model: nn.Module) -> None:
        materialize(model, self.device)  # built on meta (GPU): every rank initialises the same full model
        checkpoint_and_compile(model, self.cfg.train)
        self.initialize(model)

    def train_step(self, micro_batches: Sequence[MicroBatch]) -> torch.Tensor:
        """DeepSpeed divides each micro-batch's loss by the accumulation steps and steps on the last one."""
        total = torch.zeros((), device=self.device)
        for inputs, targets in micro_batches:
            with phase(PHASES.forward):
                loss = self.engine(inputs, targets)
            with phase(PHASES.backward):
                self.engine.backward(loss)
            with phase(PHASES.optimizer):  # a no-op but on the last micro-batch (the boundary)
                self.engine.step()
            total += loss.detach().float()
        return total / len(micro_batches)
