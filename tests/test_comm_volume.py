"""Communication bytes per rank: the cost model against what a real 2-rank gloo step issues.

The measurement is the torch profiler's trace of each gloo collective (harness/predict/commcount.py, read by
harness/trace/comm.py, as a profiled run's breakdown is): one warm-up step, then one profiled optimizer step
of the real backend. The prediction is the cost model's payload bytes × calls per collective kind
(harness/costmodel/comm.py), in the trace's convention (what each rank puts in). Tolerance 5%.
Adding a layout is one line in LAYOUTS.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.config.checks import validate
from harness.config.compose import compose, to_container
from harness.costmodel.estimate import estimate
from harness.trace.comm import predicted_bytes

ZERO3_KEEP_NOTHING = ("param_persistence_threshold", "max_reuse_distance", "prefetch_bucket_size")
LAYOUTS = {  # name: overrides (gpt-tiny, 2 ranks unless launcher.nproc says, 2 micro-batches per step; 4 with TP or
    # PP, where dp = 1)
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
    # the harness's FSDP TP splits only the blocks (Software.tp_vocab=replicated): no loss collectives, and with
    # sequence parallelism one gather where the residual stream leaves the blocks and one for its gradient
    "fsdp-tp2": ["backend=fsdp", "parallel.tp=2"],
    "fsdp-tp2-sp": ["backend=fsdp", "parallel.tp=2", "parallel.sequence_parallel=true"],
    # with its own output weight the head splits over the vocabulary: loss parallel's three all-reduces of b·s
    # fp32 values, and the head input's gradient all-reduced
    "fsdp-tp2-untied": ["backend=fsdp", "parallel.tp=2", "model.tie_embeddings=false"],
    "fsdp-tp2-sp-untied": ["backend=fsdp", "parallel.tp=2", "parallel.sequence_parallel=true",
                           "model.tie_embeddings=false"],
    "pp2": ["backend=deepspeed3d", "parallel.pp=2"],
    # FSDP inside torch's pipeline stages on 4 ranks (pp 2 x dp 2, 4 micro-batches, 1F1B): a unit stays gathered
    # from each backward to the next forward (m + 1 gathers, not 2m), and the tied embedding's shards are summed
    "fsdp-pp2-dp2": ["backend=fsdp", "parallel.pp=2", "launcher.nproc=4", "train.global_batch_size=8"],
    # context parallelism: ulysses's four all-to-alls per layer, forward and backward, and again in a recompute
    "ulysses-cp2": ["backend=ddp", "parallel.cp=2"],
    "ulysses-cp2-fsdp-full-recompute": ["backend=fsdp", "parallel.cp=2", "train.activation_checkpointing=full"],
}
COMMON = ["model=gpt-tiny", "launcher.nproc=2", "train.global_batch_size=4", "train.precision=fp32"]


@pytest.mark.multirank
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_predicted_comm_bytes_match_profiled_step(name: str, tmp_path: Path) -> None:
    from harness.launchers.local import launch_local
    from harness.predict.commcount import measure_step

    keys = {o.split("=")[0] for o in LAYOUTS[name]}
    cfg = compose([o for o in COMMON if o.split("=")[0] not in keys] + LAYOUTS[name])
    out, ranks = tmp_path / "counts.json", int(cfg.launcher.nproc)
    launch_local(ranks, measure_step, to_container(cfg), str(out))
    measured = json.loads(out.read_text())
    predicted = predicted_bytes(estimate(cfg, validate(cfg, ranks))["collectives"], gloo=True)
    # What the model leaves out must be negligible (DDP's bookkeeping broadcasts, scalar norms, the
    # pipeline's loss broadcast).
    for kind in set(measured) - set(predicted):
        assert measured[kind] <= 1e-3 * sum(measured.values()), (kind, measured)
    for kind, value in predicted.items():
        assert measured.get(kind, 0.0) == pytest.approx(value, rel=0.05), (kind, measured, predicted)
