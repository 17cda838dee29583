"""Data parallelism with a full replica per rank: PyTorch DDP through Lightning Fabric's DDP strategy.

On one rank DDP would only all-reduce every gradient with itself, which is pure overhead in a
benchmark, so a 1-rank job trains on Fabric's single-device strategy.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from harness.backends.base import FabricBackend


class DDPBackend(FabricBackend):
    name = "ddp"

    @property
    def dp_rank(self) -> int:
        return self.fabric.global_rank // self.layout.cp  # a context-parallel group's cp ranks read one share

    def strategy(self) -> Any:
        from lightning_fabric.strategies import DDPStrategy, SingleDeviceStrategy

        if self.layout.world_size == 1:
            return SingleDeviceStrategy(device=self.device)
        return DDPStrategy(timeout=timedelta(seconds=self.cfg.launcher.pg_timeout_s), **no_forward_buffer_sync())


def no_forward_buffer_sync() -> dict[str, bool]:
    """DDP's option that stops it copying rank 0's module buffers over every rank's before each forward: ring
    context parallelism shards the RoPE tables per rank in place (harness/backends/context.py), so each rank would
    rotate its chunk of the sequence with rank 0's positions. The model's buffers are functions of its config, the
    same on every rank without it. torch 2.13 names it forward_sync_buffers (and warns on broadcast_buffers);
    earlier releases only have broadcast_buffers."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    known = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in known else {"broadcast_buffers": False}
