"""One rank's bootstrap, shared by every entry point that runs in a rank (the runner, `harness
calibrate`'s probes, the communication counter): find the rank's place from its launcher, pin the
threads, pick the device and its process-group backend, join the group, and leave it.

Megatron's `parallel_state` and torchtitan's `init_distributed` keep this in one place for the same
reason: two copies of it drift (they had two different threads-per-rank rules here).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from harness.launchers.env import RankInfo, device_index, discover, export
from harness.run.stopping import raise_on_sigterm


def threads_per_rank(requested: Optional[int], local_ranks: int) -> int:
    """`launcher.omp_num_threads`, else the cores this process may use shared among its host's ranks,
    so two ranks on two cores do not fight over four threads."""
    if requested:
        return requested
    from harness.run.environment import cpu_cores

    return max(1, math.floor(cpu_cores() / max(1, local_ranks)))


@dataclass(frozen=True)
class RankContext:
    info: RankInfo
    device: torch.device


@contextlib.contextmanager
def rank_process(*, device: str = "auto", gpu_order: str = "local_rank",
                 pg_timeout_s: float = 300.0) -> Iterator[RankContext]:
    """Join the job's process group as the rank the launcher's environment names; leave it afterwards.

    The thread count comes from OMP_NUM_THREADS, which the launching process set (`threads_per_rank`).
    SIGTERM from the launcher becomes an exception, so whatever the rank owes is still written.
    """
    info = discover(os.environ)
    if info is None:
        raise RuntimeError("a rank needs a launcher environment (torchrun, srun, mpiexec or the local launcher)")
    export(info)
    raise_on_sigterm()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rank_device = select_device(device, info.local_rank, gpu_order)
    timeout = datetime.timedelta(seconds=pg_timeout_s)
    dist.init_process_group(
        backend=process_group_backend(rank_device),
        timeout=timeout,
        device_id=rank_device if rank_device.type == "cuda" else None,
        **_attempt_store(info, timeout),
    )
    try:
        yield RankContext(info, rank_device)
    finally:
        dist.destroy_process_group()


def _attempt_store(info: Any, timeout: datetime.timedelta) -> dict[str, Any]:
    """After a torch elastic restart, the agent's store still holds the failed attempt's keys (each rank's gloo
    address among them: a rank that read a dead peer's would fail to connect), and env:// adds no prefix of its
    own; so a restarted attempt joins under a prefix of its own. Nothing for a first attempt."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not attempt or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=False, timeout=timeout)
    return {"store": dist.PrefixStore(f"/harness/attempt_{attempt}", store), "rank": info.rank,
            "world_size": info.world_size}


def select_device(choice: str, local_rank: int, order: str) -> torch.device:
    """One device per rank (ROCm builds of torch drive AMD GPUs as 'cuda'; Intel GPUs are 'xpu')."""
    kind = choice
    # submitit's local executor sets CUDA_VISIBLE_DEVICES="" for a job that asks for no GPUs.
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") == "" and os.environ.get("SUBMITIT_EXECUTOR") == "local"
    if hidden and choice in ("cuda", "xpu"):
        raise RuntimeError(f"system.device={choice}, but submitit's local executor hid every GPU "
                           "(CUDA_VISIBLE_DEVICES is empty): use hydra/launcher=local, which asks for one per rank, "
                           "or give hydra.launcher.gpus_per_node=<ranks>")
    if hidden and choice == "auto" and local_rank == 0:
        print("harness: warning: CUDA_VISIBLE_DEVICES is empty (submitit's local executor, no gpus_per_node): "
              "system.device=auto runs on the CPU", file=sys.stderr)
    if choice == "auto":
        xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
        kind = "cuda" if torch.cuda.is_available() else "xpu" if xpu else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    accelerator = getattr(torch, kind)
    index = device_index(local_rank, accelerator.device_count(), order)
    accelerator.set_device(index)
    return torch.device(kind, index)


def process_group_backend(device: torch.device) -> str:
    """NCCL (RCCL on ROCm) for GPUs, oneCCL's xccl for Intel GPUs, gloo on CPU."""
    if device.type == "cuda":
        return "nccl"
    if device.type == "xpu":
        if not dist.is_xccl_available():
            raise RuntimeError("this torch build has no xccl backend for Intel GPUs; install torch 2.8+ built for XPU")
        return "xccl"
    return "gloo"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a host clock read after it times that work."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Move everything imported and built so far out of the collector's reach for the timed loop.

    Otherwise each full collection walks millions of framework objects mid-step (torchtitan and
    Megatron manage the GC in their loops for the same reason). Unfrozen afterwards, so the trainer
    and its process groups are freed while the process is whole, not left to interpreter shutdown.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
