"""Start N ranks on this host with PyTorch's elastic agent (what `torchrun --standalone` uses).

The agent owns the rendezvous (c10d store on a free port), sets the torchrun variables in each
rank, and, with no restarts allowed, ends every rank as soon as one fails: a dead rank ends the job
within `monitor_interval_s` instead of leaving its peers blocked in a collective.
"""

from __future__ import annotations

import logging
import sys
import uuid
from typing import Any, Callable

from torch.distributed.launcher.api import LaunchConfig, elastic_launch


def start_method(device: str) -> str:
    """fork where it is safe, else spawn. A forked rank starts with this process's imports (torch alone takes
    seconds per rank), but CUDA (and XPU) cannot be used in a child forked after the parent touched the driver,
    and `device=auto` may touch it: so fork only for CPU runs, or `auto` on a torch built without GPU support."""
    import torch

    gpu_build = torch.backends.cuda.is_built() or torch.version.hip is not None or \
        getattr(torch.version, "xpu", None) is not None
    cpu = device == "cpu" or (device == "auto" and not gpu_build)
    return "fork" if cpu and sys.platform == "linux" else "spawn"


def launch_local(nproc: int, entrypoint: Callable[..., Any], *args: Any, monitor_interval_s: float = 0.1,
                 start_method: str = "spawn") -> None:
    """Run `entrypoint(*args)` in `nproc` new processes; raises ChildFailedError if any rank fails."""
    # The agent's own warnings (a SIGTERM passed on to the ranks) repeat what the summary says.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=monitor_interval_s,
        start_method=start_method,
    )
    elastic_launch(config, entrypoint)(*args)
