"""Data-parallel layouts against a 1-rank reference: same seed, same data, same losses.

Every run below trains gpt-tiny in fp32 with the same global batch (4 samples) for 4 optimizer
steps (1 warm-up + 3 timed) on real gloo process groups. Gradients are averaged over ranks and
micro-batches in a different order than the reference sums them, so the losses agree to float32
rounding, not bit for bit: the tolerance is 1e-5 absolute (the losses are about 6.2).
"""

from __future__ import annotations

import pytest

from conftest import LAYOUTS, Run

TOLERANCE = 1e-5


@pytest.mark.multirank
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_losses_match_single_rank_reference(reference: Run, layout_runs: dict[str, Run], layout: str) -> None:
    expected, got = reference.losses, layout_runs[layout].losses
    assert len(got) == len(expected) == 4
    assert got == pytest.approx(expected, abs=TOLERANCE, rel=0), f"{layout}: {got} vs {expected}"
    # The losses move, so agreement is not the trivial agreement of an untrained model at ln(vocab).
    assert abs(expected[-1] - expected[0]) > 10 * TOLERANCE


@pytest.mark.multirank
def test_layout_recorded(layout_runs: dict[str, Run]) -> None:
    layout = layout_runs["ddp-2-accum"].summary["layout"]
    assert layout == {"world_size": 2, "tp": 1, "pp": 1, "dp": 2, "zero_stage": 0, "micro_batch_size": 1,
                      "global_batch_size": 4, "grad_accum": 2}
