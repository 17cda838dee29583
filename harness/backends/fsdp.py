"""Fully sharded data parallelism: FSDP2 (`fully_shard`) through Lightning Fabric's ModelParallelStrategy.

Fabric's FSDPStrategy wraps FSDP1 and refuses CPU; ModelParallelStrategy hands our `parallelize`
function a device mesh, as torchtitan's trainer does, and works on gloo and NCCL alike. Mixed
precision is FSDP2's own policy (parameters cast for compute, gradients reduced in fp32), so Fabric
itself runs at "32-true".
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
from torch import nn

from harness.backends.base import DTYPES, FabricBackend


class FSDPBackend(FabricBackend):
    name = "fsdp"

    @property
    def dp_rank(self) -> int:
        return self.fabric.strategy.device_mesh["data_parallel"].get_local_rank()

    def precision(self) -> str:
        return "32-true"

    def strategy(self) -> Any:
        from lightning.fabric.strategies import ModelParallelStrategy

        return ModelParallelStrategy(
            parallelize_fn=self.parallelize,
            data_parallel_size=self.layout.dp,
            tensor_parallel_size=self.layout.tp,
            timeout=timedelta(seconds=self.cfg.launcher.pg_timeout_s),
        )

    def parallelize(self, model: nn.Module, mesh: Any) -> nn.Module:
        """`fully_shard` every block, then the root (embeddings, final norm, head)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp_policy = MixedPrecisionPolicy(param_dtype=DTYPES[self.cfg.train.precision], reduce_dtype=torch.float32)
        dp_mesh = mesh["data_parallel"]
        reshard = self.cfg.backend.reshard_after_forward
        for block in model.blocks:
            fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp_policy)
        fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp_policy)
        return model
