"""Start N ranks on this host with PyTorch's elastic agent (what `torchrun --standalone` uses).

The agent owns the rendezvous (c10d store on a free port), sets the torchrun variables in each
rank, and, with no restarts allowed, ends every rank as soon as one fails: a dead rank ends the job
within `monitor_interval_s` instead of leaving its peers blocked in a collective.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Callable

from torch.distributed.launcher.api import LaunchConfig, elastic_launch


def launch_local(nproc: int, entrypoint: Callable[..., Any], *args: Any, monitor_interval_s: float = 0.1) -> None:
    """Run `entrypoint(*args)` in `nproc` fresh processes; raises ChildFailedError if any rank fails."""
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
        start_method="spawn",
    )
    elastic_launch(config, entrypoint)(*args)
