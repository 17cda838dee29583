"""Count the collectives one training step really issues, from the torch profiler's record of them.

`measure_step` runs on every rank of a real process group (launched with `harness.launchers.local.launch_local`):
one warm-up step, then one profiled step of the configured backend, read through the same trace parser
as a profiled run's breakdown (harness.trace.comm); rank 0 writes bytes per collective kind, the
quantity the cost model predicts (`harness.trace.comm.predicted_bytes`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any


def measure_step(config: dict[str, Any], out_path: str) -> None:
    """One warm-up step, then one profiled step of the configured backend; rank 0 writes the counts."""
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf
    from torch.profiler import ProfilerActivity, profile

    from harness.backends import make_backend
    from harness.config.checks import validate
    from harness.models.config import GPTConfig
    from harness.models.gpt import GPT
    from harness.run.data import SyntheticTokens, rank_micro_batches
    from harness.run.rank import rank_process
    from harness.trace.comm import by_kind
    from harness.trace.events import load

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
            with tempfile.TemporaryDirectory() as scratch:
                path = Path(scratch) / "trace.json"
                prof.export_chrome_trace(str(path))
                counts = by_kind(load(path), (float("-inf"), float("inf")))
            Path(out_path).write_text(json.dumps({kind: entry["bytes"] for kind, entry in counts.items()}))

