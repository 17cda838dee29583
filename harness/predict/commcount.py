"""Count the collectives one training step really issues, from the torch profiler's record of them.

Each gloo collective appears in the profiler as a `gloo:<kind>` event whose recorded input shape and
dtype give its size; an all-gather records this rank's shard, so its full tensor is that times the
group size. `measure_step` runs on every rank of a real process group (launched with
`launchers.local.launch_local`) and rank 0 writes bytes per collective kind, the same quantity as
the cost model's `payload_bytes × calls` (harness/costmodel/comm.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

ITEM_BYTES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "long": 8, "int": 4}
KINDS = {"gloo:all_reduce": "all_reduce", "gloo:all_gather": "all_gather", "gloo:reduce_scatter": "reduce_scatter",
         "gloo:send": "send_recv", "gloo:recv": None, "gloo:broadcast": "broadcast"}


def payload_by_kind(events: Any, world: int) -> dict[str, float]:
    """Bytes per collective kind from the profiler's events (receives are counted at their sender)."""
    out: dict[str, float] = {}
    for event in events:
        kind = KINDS.get(event.name)
        if kind is None or not event.input_shapes:
            continue
        nbytes = sum(math.prod(shape) * ITEM_BYTES[dtype]
                     for shape, dtype in zip(event.input_shapes, event.input_dtypes) if shape)
        out[kind] = out.get(kind, 0.0) + nbytes * (world if kind == "all_gather" else 1)
    return out


def measure_step(config: dict[str, Any], out_path: str) -> None:
    """One warm-up step, then one profiled step of the configured backend; rank 0 writes the counts."""
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf
    from torch.profiler import ProfilerActivity, profile

    from harness.backends import make_backend
    from harness.config.checks import validate
    from harness.run.data import SyntheticTokens, rank_micro_batches
    from harness.run.rank import rank_process
    from models.config import GPTConfig
    from models.gpt import GPT

    cfg = OmegaConf.create(config)
    with rank_process(device="cpu") as ctx:
        layout = validate(cfg, ctx.info.world_size)
        device = torch.device("cpu")
        backend = make_backend(cfg, layout, device)
        torch.manual_seed(cfg.train.seed)
        backend.setup(GPT(GPTConfig.from_section(cfg.model)))
        data = SyntheticTokens(vocab_size=cfg.model.vocab_size, seq_len=cfg.model.seq_len, seed=cfg.train.seed)

        def step(i: int) -> None:
            backend.train_step(rank_micro_batches(data, step=i, layout=layout, dp_rank=backend.dp_rank, device=device))

        step(0)
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step(1)
        if ctx.info.rank == 0:
            Path(out_path).write_text(json.dumps(payload_by_kind(prof.events(), ctx.info.world_size)))

