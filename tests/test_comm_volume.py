"""Communication bytes per rank: the cost model against what a real 2-rank gloo step issues.

The measurement is the torch profiler's record of each gloo collective (harness/commcount.py): one
warm-up step, then one profiled optimizer step of the real backend. The prediction is the cost
model's payload bytes × calls per collective kind (harness/costmodel/comm.py). Tolerance 5%.
Adding a layout is one line in LAYOUTS.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.config.checks import validate
from harness.config.compose import compose, to_container
from harness.costmodel.comm import collectives
from harness.costmodel.layout import job_from_config

ZERO3_KEEP_NOTHING = ("param_persistence_threshold", "max_reuse_distance", "prefetch_bucket_size")
LAYOUTS = {  # name: overrides (gpt-tiny, 2 ranks, 2 micro-batches per step; 4 with TP or PP, where dp = 1)
    "ddp": ["backend=ddp"],
    "fsdp-full_shard": ["backend=fsdp", "backend.sharding=full_shard"],
    "fsdp-shard_grad_op": ["backend=fsdp", "backend.sharding=shard_grad_op"],
    "zero1": ["backend=deepspeed", "parallel.zero_stage=1"],
    "zero2": ["backend=deepspeed", "parallel.zero_stage=2"],
    # ZeRO-3's general path (what a large model's weight matrices take): every tensor gathered at each use.
    "zero3": ["backend=deepspeed", "parallel.zero_stage=3"]
    + [f"+backend.ds_config.zero_optimization.stage3_{k}=0" for k in ZERO3_KEEP_NOTHING],
    # DeepSpeed's defaults: gpt-tiny's tensors are all under the persistence threshold (1e5 elements).
    "zero3-default": ["backend=deepspeed", "parallel.zero_stage=3"],
    "tp2": ["backend=deepspeed3d", "parallel.tp=2"],
    "pp2": ["backend=deepspeed3d", "parallel.pp=2"],
}
COMMON = ["model=gpt-tiny", "launcher.nproc=2", "train.global_batch_size=4", "train.precision=fp32"]


GLOO_KIND = {"reduce_scatter": "all_reduce"}
"""ProcessGroupGloo has no reduce_scatter_tensor, so FSDP2 on gloo reduces the gradients with an
all-reduce of the same full tensor (what the profiler records); NCCL runs the reduce-scatter."""


def predicted_by_kind(cfg, world: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    out: dict[str, float] = {}
    for c in collectives(job_from_config(cfg, validate(cfg, world))):
        kind = GLOO_KIND.get(c.kind, c.kind)
        out[kind] = out.get(kind, 0.0) + c.payload_bytes * c.calls
    return out


@pytest.mark.multirank
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_predicted_comm_bytes_match_profiled_step(name: str, tmp_path: Path) -> None:
    from harness.predict.commcount import measure_step
    from launchers.local import launch_local

    cfg = compose(COMMON + LAYOUTS[name])
    out = tmp_path / "counts.json"
    launch_local(2, measure_step, to_container(cfg), str(out))
    measured = json.loads(out.read_text())
    predicted = predicted_by_kind(cfg, 2)
    # What the model leaves out must be negligible (DDP's bookkeeping broadcasts, scalar norms, the
    # pipeline's loss broadcast).
    for kind in set(measured) - set(predicted):
        assert measured[kind] <= 1e-3 * sum(measured.values()), (kind, measured)
    for kind, value in predicted.items():
        assert measured.get(kind, 0.0) == pytest.approx(value, rel=0.05), (kind, measured, predicted)
