"""Data-parallel layouts against a 1-rank reference: same seed, same data, same losses.

Every run below trains gpt-tiny in fp32 with the same global batch (4 samples) for 4 optimizer
steps (1 warm-up + 3 timed) on real gloo process groups. Gradients are averaged over ranks and
micro-batches in a different order than the reference sums them, so the losses agree to float32
rounding, not bit for bit: the tolerance is 1e-5 absolute (the losses are about 6.2).
"""

from __future__ import annotations

import pytest
from conftest import LAYOUTS, Run, assert_losses_match

TOLERANCE = 1e-5


@pytest.mark.multirank
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_losses_match_single_rank_reference(reference: Run, layout_runs: dict[str, Run], layout: str) -> None:
    assert_losses_match(reference, layout_runs[layout], TOLERANCE, layout)


@pytest.mark.multirank
def test_layout_recorded(layout_runs: dict[str, Run]) -> None:
    layout = layout_runs["ddp-2-accum"].summary["layout"]
    assert layout == {"world_size": 2, "tp": 1, "pp": 1, "dp": 2, "zero_stage": 0, "micro_batch_size": 1,
                      "global_batch_size": 4, "grad_accum": 2, "cp": 1}
