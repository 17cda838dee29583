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


def launch_local(nproc: int, entrypoint: Callable[..., Any], *args: Any, monitor_interval_s: float = 0.1,
                 max_restarts: int = 0) -> None:
    """Run `entrypoint(*args)` in `nproc` fresh processes, all of them again up to `max_restarts` times after one
    fails (TORCHELASTIC_RESTART_COUNT tells them which attempt); raises ChildFailedError when the last fails."""
    # The agent's own warnings (a SIGTERM passed on to the ranks) repeat what the summary says.
    # With restarts, a rank's death is expected and said by the next attempt ("restart 1: resuming from ..."), not
    # by the agent's traceback; without, the summary names it.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL if max_restarts else logging.ERROR)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=max_restarts,
        monitor_interval=monitor_interval_s,
        start_method="spawn",
    )
    elastic_launch(config, entrypoint)(*args)
